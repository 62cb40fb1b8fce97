// The no-op handler of benchmarks/runtimes.py under runtime = "nodejs".
exports.handler = async () => ({ pid: process.pid });
