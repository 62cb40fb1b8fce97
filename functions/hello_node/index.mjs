// A Node.js function (runtime = "nodejs", handler = "index.handler"): an ES module, async style.
let calls = 0; // module state persists while the worker stays warm, as in Lambda

export const handler = async (event, context) => {
  calls += 1;
  const name = event && typeof event.name === "string" ? event.name : "world";
  console.log(`greeting ${name} (call ${calls} in worker ${process.pid})`);
  return { message: `hello, ${name}!`, warm_calls: calls, request_id: context.awsRequestId };
};
