// The no-op handler of benchmarks/runtimes.py as a Go `provided` bootstrap, standard library
// only: the Runtime API loop on one kept-alive connection, answering {"pid": N}.
package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	api := "http://" + os.Getenv("AWS_LAMBDA_RUNTIME_API") + "/2018-06-01/runtime"
	client := &http.Client{}
	answer := []byte(fmt.Sprintf(`{"pid":%d}`, os.Getpid()))
	for {
		next, err := client.Get(api + "/invocation/next")
		if err != nil {
			os.Exit(1)
		}
		io.Copy(io.Discard, next.Body)
		next.Body.Close()
		id := next.Header.Get("Lambda-Runtime-Aws-Request-Id")
		posted, err := client.Post(api+"/invocation/"+id+"/response", "application/json", bytes.NewReader(answer))
		if err != nil {
			os.Exit(1)
		}
		io.Copy(io.Discard, posted.Body)
		posted.Body.Close()
	}
}
