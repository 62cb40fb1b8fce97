// lambdaemon's Node.js runtime: runs `handler = "FILE.FUNCTION"` of a function with
// runtime = "nodejs" on Lambda's Runtime API (AWS_LAMBDA_RUNTIME_API), which daemon/pool/runtime.py
// serves. FILE.js, FILE.mjs or FILE.cjs in LAMBDA_TASK_ROOT, a CommonJS or an ES module; the
// handler is `async (event, context)` (or returns a promise) or `(event, context, callback)`.
// The callback's answer is sent at once (callbackWaitsForEmptyEventLoop is not honoured).
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import util from "node:util";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const [host, port] = (process.env.AWS_LAMBDA_RUNTIME_API || "").split(":");
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const BASE = "/2018-06-01/runtime";
let requestId = "";

function call(method, route, body, headers) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : Buffer.from(body);
    const req = http.request(
      {
        host,
        port: Number(port),
        method,
        path: BASE + route,
        agent,
        headers: data ? { "Content-Type": "application/json", "Content-Length": data.length, ...headers } : headers,
      },
      (res) => {
        const chunks = [];
        res.on("data", (chunk) => chunks.push(chunk));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end(data);
  });
}

// console.* as Lambda writes it: time, request id, level, message, one record per call.
for (const [name, level] of [["log", "INFO"], ["info", "INFO"], ["warn", "WARN"], ["error", "ERROR"], ["debug", "DEBUG"], ["trace", "TRACE"]]) {
  console[name] = (...args) => {
    const text = util.format(...args).replace(/\n/g, "\r");
    fs.writeSync(1, `${new Date().toISOString()}\t${requestId || "undefined"}\t${level}\t${text}\n`);
  };
}

function errorBody(error) {
  const isError = error instanceof Error;
  return {
    errorType: isError ? error.name : typeof error === "string" ? "string" : "Error",
    errorMessage: isError ? error.message : String(error),
    trace: isError && error.stack ? error.stack.split("\n") : [],
  };
}

class InitError extends Error {
  constructor(type, message) {
    super(message);
    this.name = type;
  }
}

async function loadHandler() {
  const spec = process.env._HANDLER || "";
  const dot = spec.lastIndexOf(".");
  if (dot <= 0) throw new InitError("Runtime.MalformedHandlerName", `Bad handler '${spec}'`);
  const moduleName = spec.slice(0, dot);
  const functionName = spec.slice(dot + 1);
  const root = process.env.LAMBDA_TASK_ROOT || process.cwd();
  const file = [".js", ".mjs", ".cjs"].map((ext) => path.join(root, moduleName + ext)).find((f) => fs.existsSync(f));
  if (!file) throw new InitError("Runtime.ImportModuleError", `Error: Cannot find module '${moduleName}'`);
  let module;
  try {
    if (file.endsWith(".mjs")) {
      module = await import(pathToFileURL(file).href);
    } else {
      try {
        module = createRequire(file)(file);
      } catch (error) {
        if (error.code !== "ERR_REQUIRE_ESM") throw error;
        module = await import(pathToFileURL(file).href);
      }
    }
  } catch (error) {
    if (error instanceof SyntaxError) throw new InitError("Runtime.UserCodeSyntaxError", `${error.name}: ${error.message}`);
    throw error;
  }
  const handler = module[functionName] ?? module.default?.[functionName];
  if (typeof handler !== "function") {
    throw new InitError("Runtime.HandlerNotFound", `${moduleName}.${functionName} is undefined or not exported`);
  }
  return handler;
}

function context(headers) {
  const deadline = Number(headers["lambda-runtime-deadline-ms"]);
  const env = process.env;
  const parse = (text) => (text ? JSON.parse(text) : undefined);
  return {
    callbackWaitsForEmptyEventLoop: true,
    functionName: env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    logGroupName: env.AWS_LAMBDA_LOG_GROUP_NAME,
    logStreamName: env.AWS_LAMBDA_LOG_STREAM_NAME,
    invokedFunctionArn: headers["lambda-runtime-invoked-function-arn"],
    awsRequestId: headers["lambda-runtime-aws-request-id"],
    clientContext: parse(headers["lambda-runtime-client-context"]),
    identity: parse(headers["lambda-runtime-cognito-identity"]),
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
}

function run(handler, event, ctx) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const callback = (error, result) => {
      if (settled) return;
      settled = true;
      if (error !== undefined && error !== null) reject(error);
      else resolve(result);
    };
    ctx.done = callback;
    ctx.succeed = (result) => callback(null, result);
    ctx.fail = (error) => callback(error ?? "handled");
    try {
      const returned = handler(event, ctx, callback);
      if (returned && typeof returned.then === "function") returned.then((r) => callback(null, r), (e) => callback(e ?? "rejected"));
      else if (handler.length < 3) callback(null, returned);
    } catch (error) {
      callback(error);
    }
  });
}

async function fail(id, error) {
  const body = errorBody(error);
  console.error("Invoke Error", JSON.stringify(body));
  await call("POST", `/invocation/${id}/error`, JSON.stringify(body), { "Lambda-Runtime-Function-Error-Type": body.errorType });
}

async function main() {
  let handler;
  try {
    handler = await loadHandler();
  } catch (error) {
    const body = errorBody(error);
    console.error(`${body.errorType}: ${body.errorMessage}`);
    await call("POST", "/init/error", JSON.stringify(body), { "Lambda-Runtime-Function-Error-Type": body.errorType });
    process.exit(1);
  }
  process.on("uncaughtException", async (error) => {
    if (requestId) await fail(requestId, error);
    process.exit(129);
  });
  process.on("unhandledRejection", async (reason) => {
    if (requestId) await fail(requestId, reason);
    process.exit(128);
  });
  for (;;) {
    const next = await call("GET", "/invocation/next");
    if (next.status !== 200) throw new Error(`invocation/next answered ${next.status}: ${next.body}`);
    const id = next.headers["lambda-runtime-aws-request-id"];
    requestId = id;
    if (next.headers["lambda-runtime-trace-id"]) process.env._X_AMZN_TRACE_ID = next.headers["lambda-runtime-trace-id"];
    let result;
    try {
      const event = next.body.length ? JSON.parse(next.body.toString("utf8")) : {};
      result = await run(handler, event, context(next.headers));
    } catch (error) {
      await fail(id, error);
      requestId = "";
      continue;
    }
    let payload;
    try {
      payload = JSON.stringify(result === undefined ? null : result);
    } catch (error) {
      await fail(id, Object.assign(new Error(`Unable to stringify response body: ${error.message}`), { name: "Runtime.MarshalError" }));
      requestId = "";
      continue;
    }
    await call("POST", `/invocation/${id}/response`, payload);
    requestId = "";
  }
}

main();
