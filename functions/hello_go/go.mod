module lambdaemon.example/hello_go

go 1.19
