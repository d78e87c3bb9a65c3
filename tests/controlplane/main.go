// Command controlplane runs a real, single-machine Kubernetes cluster for the
// service-ca-operator tests: embedded etcd, kube-apiserver, a trimmed
// kube-controller-manager, kube-scheduler and one hollow node (the real kubelet over a
// fake container runtime), all built from the published Kubernetes Go modules.
//
// One binary plays five roles:
//
//	controlplane run --data-dir DIR        the harness (default role)
//	controlplane kube-apiserver ...        the real kube-apiserver command
//	controlplane kube-controller-manager … the real kube-controller-manager command
//	controlplane kube-scheduler ...        the real kube-scheduler command
//	controlplane kubelet ...               the hollow node (node.go)
//
// The harness keeps etcd in its own process and starts the Kubernetes
// components as child processes of itself (same executable, other role), so the
// API server can be stopped and started again without losing state (SIGUSR1 stops
// it, SIGUSR2 starts it again) — the operator's outage tests rely on that.
package main

import (
	"fmt"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	role := "run"
	args := os.Args[1:]
	if len(args) > 0 {
		switch args[0] {
		case "run", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet":
			role, args = args[0], args[1:]
		}
	}
	switch role {
	case "kube-apiserver":
		cmd := apiserver.NewAPIServerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "kube-controller-manager":
		cmd := controllermanager.NewControllerManagerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "kube-scheduler":
		cmd := scheduler.NewSchedulerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "kubelet":
		if err := runKubelet(args); err != nil {
			fmt.Fprintf(os.Stderr, "kubelet: %v\n", err)
			os.Exit(1)
		}
	default:
		if err := runHarness(args); err != nil {
			fmt.Fprintf(os.Stderr, "controlplane: %v\n", err)
			os.Exit(1)
		}
	}
}
