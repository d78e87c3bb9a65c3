package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"time"

	clientset "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	fakeremote "k8s.io/cri-client/pkg/fake"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kubelet/app/options"
	kubeletconfig "k8s.io/kubernetes/pkg/kubelet/apis/config"
	cadvisortest "k8s.io/kubernetes/pkg/kubelet/cadvisor/testing"
	"k8s.io/kubernetes/pkg/kubelet/cm"
	kubetypes "k8s.io/kubernetes/pkg/kubelet/types"
	"k8s.io/kubernetes/pkg/kubemark"

	remote "k8s.io/cri-client/pkg"
)

// runKubelet is the "kubelet" role: Kubernetes' hollow node (what cmd/kubemark does
// with --morph=kubelet): the real kubelet code — pod workers, volume manager and its
// secret, configMap and projected plugins, the pod-certificate manager, node status
// and lease — over the fake CRI runtime and image service of k8s.io/cri-client, a stub
// container manager and a fake cAdvisor. Containers do not run; volumes are real files
// under --root-dir (the fake mounter makes every "mount" a plain directory).
func runKubelet(args []string) error {
	fs := flag.NewFlagSet("kubelet", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig with the node's system:node:<name> client certificate")
	name := fs.String("name", "", "the node's name")
	rootDir := fs.String("root-dir", "", "the kubelet's root directory (pods/<uid>/volumes/... live here)")
	klog.InitFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *kubeconfig == "" || *name == "" || *rootDir == "" {
		return fmt.Errorf("kubelet: --kubeconfig, --name and --root-dir are required")
	}
	ctx := context.Background()
	restConfig, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return err
	}
	restConfig.UserAgent = "hollow-kubelet"
	restConfig.QPS, restConfig.Burst = 50, 100
	client, err := clientset.NewForConfig(restConfig)
	if err != nil {
		return err
	}
	flags, config, err := kubeletConfig(*name, *rootDir)
	if err != nil {
		return err
	}
	heartbeatConfig := *restConfig
	heartbeatConfig.Timeout = config.NodeStatusUpdateFrequency.Duration
	heartbeatConfig.QPS = -1
	heartbeatClient, err := clientset.NewForConfig(&heartbeatConfig)
	if err != nil {
		return err
	}

	endpoint, err := fakeremote.GenerateEndpoint()
	if err != nil {
		return err
	}
	fakeRuntime := fakeremote.NewFakeRemoteRuntime()
	if err := fakeRuntime.Start(endpoint); err != nil {
		return fmt.Errorf("starting the fake CRI runtime: %w", err)
	}
	defer fakeRuntime.Stop()
	runtimeService, err := remote.NewRemoteRuntimeServiceBuilder().WithEndpoint(endpoint).
		WithConnectionTimeout(15 * time.Second).Build(ctx)
	if err != nil {
		return fmt.Errorf("connecting to the fake CRI runtime: %w", err)
	}

	node := kubemark.NewHollowKubelet(flags, config, client, heartbeatClient,
		&cadvisortest.Fake{NodeName: *name}, fakeRuntime.ImageService, runtimeService,
		cm.NewStubContainerManager())
	// kubemark drops the kubelet's events (a fake recorder); tests want to see what the
	// kubelet reports about a pod (FailedMount, ...), so they go to the API server as in
	// a cluster (RunKubelet makes the real recorder when none is given).
	node.KubeletDeps.Recorder = nil
	node.KubeletDeps.EventClient = client.CoreV1()
	klog.Infof("hollow kubelet %s with root directory %s", *name, *rootDir)
	node.Run(ctx) // blocks; exits the process on failure
	return nil
}

// kubeletConfig follows kubemark.GetHollowKubeletConfig, with our root directory, no
// kubelet server (nothing here needs logs or exec, and two harnesses on one machine
// must not fight over port 10250) and a 10s sync so Secret and ConfigMap volumes follow
// their objects quickly.
func kubeletConfig(name, rootDir string) (*options.KubeletFlags, *kubeletconfig.KubeletConfiguration, error) {
	f := options.NewKubeletFlags()
	f.RootDirectory = rootDir
	f.HostnameOverride = name
	f.MinimumGCAge.Duration = time.Minute
	f.MaxContainerCount = 100
	f.MaxPerPodContainerCount = 2

	c, err := options.NewKubeletConfiguration()
	if err != nil {
		return nil, nil, err
	}
	c.EnableServer = false
	c.ReadOnlyPort = 0
	c.HealthzPort = 0
	c.StaticPodURL = ""
	c.StaticPodPath = ""
	c.SyncFrequency.Duration = 10 * time.Second
	c.NodeStatusUpdateFrequency.Duration = 10 * time.Second
	c.NodeStatusReportFrequency.Duration = time.Minute
	c.EvictionPressureTransitionPeriod.Duration = 5 * time.Minute
	c.MaxPods = 110
	c.ClusterDNS = []string{}
	c.ImageGCHighThresholdPercent = 90
	c.ImageGCLowThresholdPercent = 80
	c.ProviderID = "kubemark://" + name
	c.VolumeStatsAggPeriod.Duration = time.Minute
	c.CgroupRoot = ""
	c.CgroupsPerQOS = false
	c.KubeletCgroups = ""
	c.SystemCgroups = ""
	c.EnableControllerAttachDetach = false
	c.HairpinMode = kubeletconfig.HairpinVeth
	c.MaxOpenFiles = 1024
	c.ResolverConfig = kubetypes.ResolvConfDefault
	c.SerializeImagePulls = true
	c.ProtectKernelDefaults = false
	c.RegisterNode = true
	c.LocalStorageCapacityIsolation = true
	c.PodLogsDir = filepath.Join(rootDir, "pod-logs")
	return f, c, nil
}
