// A CommonJS handler in the callback style, and one that throws, for the nodejs runtime's tests.
let calls = 0;

exports.handler = (event, context, callback) => {
  calls += 1;
  console.log("cjs called", calls);
  setTimeout(() => callback(null, { calls, pid: process.pid, remaining: context.getRemainingTimeInMillis() > 0, arn: context.invokedFunctionArn, event }), 1);
};

exports.fails = async () => {
  throw new TypeError("bad thing");
};

exports.crash = () => {
  process.exit(5);
};
