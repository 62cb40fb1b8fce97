module lambdaemon.bench/noop_go

go 1.19
