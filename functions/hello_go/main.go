// A Go function on Lambda's Runtime API, standard library only (runtime = "provided").
//
// Build the bootstrap with Debian's Go toolchain (apt-get install golang-go):
//
//	cd functions/hello_go && CGO_ENABLED=0 go build -o bootstrap .
//
// The loop is the whole runtime: ask for the next event, run the handler, post its result.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

type event struct {
	Name string `json:"name"`
}

type result struct {
	Message   string `json:"message"`
	WarmCalls int    `json:"warm_calls"`
	RequestID string `json:"request_id"`
}

var calls int // package state persists while the worker stays warm, as in Lambda

func handle(requestID string, body []byte) (any, error) {
	var in event
	if len(bytes.TrimSpace(body)) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return nil, fmt.Errorf("the event is not a JSON object: %w", err)
		}
	}
	if in.Name == "" {
		in.Name = "world"
	}
	calls++
	if in.Name != "quiet" {
		fmt.Printf("greeting %s (call %d in worker %d)\n", in.Name, calls, os.Getpid())
	}
	return result{Message: "hello, " + in.Name + "!", WarmCalls: calls, RequestID: requestID}, nil
}

func main() {
	api := "http://" + os.Getenv("AWS_LAMBDA_RUNTIME_API") + "/2018-06-01/runtime"
	client := &http.Client{} // one kept-alive connection to the Runtime API
	for {
		next, err := client.Get(api + "/invocation/next")
		if err != nil {
			fmt.Fprintln(os.Stderr, "invocation/next:", err)
			os.Exit(1)
		}
		body, _ := io.ReadAll(next.Body)
		next.Body.Close()
		id := next.Header.Get("Lambda-Runtime-Aws-Request-Id")
		out, err := handle(id, body)
		failed := err != nil
		var url string
		var payload []byte
		if failed {
			url = api + "/invocation/" + id + "/error"
			payload, _ = json.Marshal(map[string]string{"errorMessage": err.Error(), "errorType": "Function.InvalidEvent"})
		} else {
			url = api + "/invocation/" + id + "/response"
			payload, _ = json.Marshal(out)
		}
		req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(payload))
		if failed {
			req.Header.Set("Lambda-Runtime-Function-Error-Type", "Function.InvalidEvent")
		}
		answer, err := client.Do(req)
		if err != nil || !strings.HasPrefix(answer.Status, "202") {
			fmt.Fprintln(os.Stderr, "posting the result:", err)
			os.Exit(1)
		}
		io.Copy(io.Discard, answer.Body)
		answer.Body.Close()
	}
}
