// gokeys: the reference for `BENCH_ONLY=rsa` (benches/scale/keygen.rs). Makes N
// RSA-2048 keys with Go's crypto/rsa (and encodes each as PKCS#8, as the original
// does before writing it) on T goroutines, and prints two numbers: wall-clock
// milliseconds per key and CPU milliseconds per key (user + system, whole process).
//
//	gokeys N T
package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

func cpuMillis() float64 {
	var r syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &r); err != nil {
		panic(err)
	}
	return float64(r.Utime.Nano()+r.Stime.Nano()) / 1e6
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: gokeys KEYS THREADS")
		os.Exit(2)
	}
	n, err1 := strconv.Atoi(os.Args[1])
	t, err2 := strconv.Atoi(os.Args[2])
	if err1 != nil || err2 != nil || n < 1 || t < 1 {
		fmt.Fprintln(os.Stderr, "usage: gokeys KEYS THREADS (both at least 1)")
		os.Exit(2)
	}
	jobs := make(chan struct{}, n)
	for i := 0; i < n; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	cpu0, start := cpuMillis(), time.Now()
	var wg sync.WaitGroup
	for w := 0; w < t; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				key, err := rsa.GenerateKey(rand.Reader, 2048)
				if err != nil {
					panic(err)
				}
				if _, err := x509.MarshalPKCS8PrivateKey(key); err != nil {
					panic(err)
				}
			}
		}()
	}
	wg.Wait()
	wall := float64(time.Since(start).Microseconds()) / 1000
	fmt.Printf("%.3f %.3f\n", wall/float64(n), (cpuMillis()-cpu0)/float64(n))
}
