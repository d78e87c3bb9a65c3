package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// The kube-controller-manager runs what the operator's behaviour needs to be real:
// owner-reference garbage collection, namespace deletion, default service accounts,
// their tokens, and kube-root-ca.crt.
const controllers = "garbage-collector-controller,namespace-controller,serviceaccount-controller," +
	"serviceaccount-token-controller,root-ca-certificate-publisher-controller"

// With the node it also runs the workload controllers, so a Deployment becomes pods,
// and node lifecycle, which lifts the not-ready taint a new node registers with
// (without it nothing is ever scheduled).
const nodeControllers = ",deployment-controller,replicaset-controller,statefulset-controller," +
	"daemonset-controller,job-controller,node-lifecycle-controller,ttl-controller"

type harness struct {
	dataDir     string
	auditPolicy string
	verbosity   int
	etcdURL     string
	apiPort     int
	serverURL   string
	pki         *pkiFiles
	kubeconfig  string
	client      *http.Client

	spawn  chan spawnRequest
	exited chan childExit

	withNode bool
	nodeName string

	etcd                               *embed.Etcd
	apiserver, kcm, scheduler, kubelet *child
}

type child struct {
	name     string
	cmd      *exec.Cmd
	stopping bool
}

type childExit struct {
	c   *child
	err error
}

type spawnRequest struct {
	cmd   *exec.Cmd
	reply chan error
}

func runHarness(args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "target/controlplane", "directory for state, logs and the admin kubeconfig (wiped at start)")
	verbosity := fs.Int("v", 1, "log verbosity passed to kube-apiserver and kube-controller-manager")
	exitWithParent := fs.Bool("exit-with-parent", false, "shut down when the process that started the harness exits")
	withNode := fs.Bool("node", true, "also run kube-scheduler and one hollow node (the real kubelet over a fake container runtime)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		return err
	}
	// Every start is a fresh cluster: stale etcd data or certificates from an earlier
	// run would only make tests depend on history.
	for _, stale := range []string{"etcd", "pki", "kubeconfig", "harness.pid", "kube-apiserver.log", "kube-controller-manager.log", "etcd.log", "audit.log", "audit-policy.yaml",
		"kube-scheduler.log", "kubelet.log", "node", nodeInfoFile} {
		if err := os.RemoveAll(filepath.Join(dir, stale)); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	h := &harness{
		dataDir:     dir,
		auditPolicy: filepath.Join(dir, "audit-policy.yaml"),
		verbosity:   *verbosity,
		kubeconfig:  filepath.Join(dir, "kubeconfig"),
		spawn:       make(chan spawnRequest),
		exited:      make(chan childExit, 8),
		withNode:    *withNode,
		nodeName:    nodeName,
	}
	go h.spawner()

	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1, syscall.SIGUSR2)
	if *exitWithParent {
		go watchParent(signals)
	}

	// Free ports are picked by binding port 0 and closing it; another process can
	// take one before etcd or the API server binds it. Start again with new ports.
	for attempt := 1; ; attempt++ {
		err = h.start()
		if err == nil || attempt == 5 || !strings.Contains(err.Error(), "address already in use") {
			break
		}
		fmt.Fprintf(os.Stderr, "note: a port was taken meanwhile (%v); starting again\n", err)
		h.shutdown()
		h.etcd, h.apiserver, h.kcm, h.scheduler, h.kubelet = nil, nil, nil, nil, nil
		if err := os.RemoveAll(filepath.Join(dir, "etcd")); err != nil {
			return err
		}
	}
	if err == nil {
		err = h.serve(signals)
	}
	h.shutdown()
	return err
}

// start brings up etcd, kube-apiserver and kube-controller-manager, writes the
// kubeconfig and prints READY once the cluster is usable.
func (h *harness) start() error {
	began := time.Now()
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	h.apiPort = ports[2]
	h.serverURL = fmt.Sprintf("https://127.0.0.1:%d", h.apiPort)
	if h.pki, err = writePKI(filepath.Join(h.dataDir, "pki"), h.nodeName); err != nil {
		return fmt.Errorf("minting certificates: %w", err)
	}
	if err := os.WriteFile(filepath.Join(h.dataDir, "harness.pid"), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(h.auditPolicy, []byte(auditPolicy), 0o644); err != nil {
		return err
	}
	if err := h.startEtcd(ports[0], ports[1]); err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(h.pki.caPEM)
	clientCert, err := tls.X509KeyPair(h.pki.adminCertPEM, h.pki.adminKeyPEM)
	if err != nil {
		return err
	}
	h.client = &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{clientCert}}},
	}

	if err := h.startAPIServer(); err != nil {
		return err
	}
	if err := writeKubeconfig(h.kubeconfig, h.serverURL, h.pki.caPEM, "admin", h.pki.adminCertPEM, h.pki.adminKeyPEM); err != nil {
		return err
	}
	if h.kcm, err = h.startChild("kube-controller-manager", h.controllerManagerArgs()); err != nil {
		return err
	}
	for _, path := range []string{"/api/v1/namespaces/default", "/api/v1/namespaces/default/serviceaccounts/default"} {
		if err := h.waitOK(path, 3*time.Minute); err != nil {
			return err
		}
	}
	node := ""
	if h.withNode {
		if err := h.startNode(); err != nil {
			return err
		}
		node = fmt.Sprintf(" node=%s node-root=%s", h.nodeName, h.nodeRoot())
	}
	fmt.Printf("READY kubeconfig=%s server=%s pid=%d startup=%s%s\n", h.kubeconfig, h.serverURL, os.Getpid(), time.Since(began).Round(time.Millisecond), node)
	return nil
}

// serve waits for a signal or an unexpected child exit.
func (h *harness) serve(signals chan os.Signal) error {
	for {
		select {
		case sig := <-signals:
			switch sig {
			case syscall.SIGUSR1:
				if h.apiserver != nil {
					h.stopChild(h.apiserver)
					h.apiserver = nil
					fmt.Println("APISERVER STOPPED")
				}
			case syscall.SIGUSR2:
				if h.apiserver == nil {
					if err := h.startAPIServer(); err != nil {
						return err
					}
					fmt.Println("APISERVER STARTED")
				}
			default:
				fmt.Printf("STOPPING on %s\n", sig)
				return nil
			}
		case ex := <-h.exited:
			if ex.c.stopping {
				continue
			}
			return fmt.Errorf("%s exited unexpectedly (%v); last log lines:\n%s", ex.c.name, ex.err, tailLog(h.logPath(ex.c.name), 30))
		}
	}
}

func (h *harness) startAPIServer() error {
	c, err := h.startChild("kube-apiserver", h.apiServerArgs())
	if err != nil {
		return err
	}
	h.apiserver = c
	return h.waitOK("/readyz", 3*time.Minute)
}

func (h *harness) apiServerArgs() []string {
	p := h.pki
	return []string{
		"--etcd-servers=" + h.etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// The default lease reconciler refuses a loopback address; nothing needs the
		// kubernetes Service endpoints here.
		"--endpoint-reconciler-type=none",
		"--secure-port=" + strconv.Itoa(h.apiPort),
		"--cert-dir=" + filepath.Join(h.dataDir, "pki", "generated"),
		"--tls-cert-file=" + p.servingCert,
		"--tls-private-key-file=" + p.servingKey,
		"--client-ca-file=" + p.caCert,
		// As in a cluster: the node's kubelet is authorised by the Node authorizer and
		// its writes checked by NodeRestriction (both inert for other identities).
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.saPub,
		"--service-account-signing-key-file=" + p.saKey,
		"--service-cluster-ip-range=10.96.0.0/16",
		"--requestheader-client-ca-file=" + p.frontProxyCA,
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file=" + p.proxyClientCert,
		"--proxy-client-key-file=" + p.proxyClient,
		"--profiling=false",
		// What service accounts do is recorded, so tests can compare the operator's
		// requests with the permissions its manifests grant.
		"--audit-policy-file=" + h.auditPolicy,
		"--audit-log-path=" + filepath.Join(h.dataDir, "audit.log"),
		"--audit-log-maxsize=500",
		"--v=" + strconv.Itoa(h.verbosity),
	}
}

// auditPolicy records request metadata of service accounts only (the operator under
// test authenticates as one; admin traffic stays out of the log).
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
`

func (h *harness) controllerManagerArgs() []string {
	enabled := controllers
	if h.withNode {
		enabled += nodeControllers
	}
	return []string{
		"--kubeconfig=" + h.kubeconfig,
		"--controllers=" + enabled,
		"--service-account-private-key-file=" + h.pki.saKey,
		"--root-ca-file=" + h.pki.caCert,
		"--use-service-account-credentials=false",
		"--leader-elect=false",
		"--secure-port=0",
		"--v=" + strconv.Itoa(h.verbosity),
	}
}

func (h *harness) startEtcd(clientPort, peerPort int) error {
	cfg := embed.NewConfig()
	cfg.Name = "controlplane"
	cfg.Dir = filepath.Join(h.dataDir, "etcd")
	clientURL, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", clientPort))
	peerURL, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", peerPort))
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = []url.URL{*peerURL}
	cfg.AdvertisePeerUrls = []url.URL{*peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{h.logPath("etcd")}
	// Test data is disposable: skipping fsync keeps a 2-core machine responsive.
	cfg.UnsafeNoFsync = true
	// The benchmarks write a few GiB (B5 alone: five runs of 10,000 32 KiB Secrets);
	// etcd's default 2 GiB quota would stop the cluster half-way.
	cfg.QuotaBackendBytes = 8 << 30
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return errors.New("etcd not ready after 60s")
	}
	h.etcdURL = clientURL.String()
	h.etcd = e
	return nil
}

func (h *harness) logPath(name string) string {
	return filepath.Join(h.dataDir, name+".log")
}

// spawner starts every child from one OS thread that never exits: Pdeathsig is tied
// to the thread that forked, so this is what makes "if the harness dies, its
// children die too" hold.
func (h *harness) spawner() {
	runtime.LockOSThread()
	for req := range h.spawn {
		req.reply <- req.cmd.Start()
	}
}

func (h *harness) startChild(name string, args []string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	logFile, err := os.OpenFile(h.logPath(name), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, append([]string{name}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	reply := make(chan error)
	h.spawn <- spawnRequest{cmd: cmd, reply: reply}
	if err := <-reply; err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd}
	go func() {
		err := cmd.Wait()
		logFile.Close()
		h.exited <- childExit{c: c, err: err}
	}()
	return c, nil
}

// stopChild asks politely, then insists. kube-apiserver stops listening at once on
// SIGTERM but can linger for a long time afterwards, so the patience is short.
func (h *harness) stopChild(c *child) {
	if c == nil || c.cmd.ProcessState != nil {
		return
	}
	c.stopping = true
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.After(5 * time.Second)
	for {
		select {
		case ex := <-h.exited:
			if ex.c == c {
				return
			}
			// Another child ended while we waited; keep its news for serve().
			go func() { h.exited <- ex }()
		case <-deadline:
			_ = c.cmd.Process.Kill()
			deadline = time.After(5 * time.Second)
		}
	}
}

func (h *harness) shutdown() {
	h.stopChild(h.kubelet)
	h.stopChild(h.scheduler)
	h.stopChild(h.kcm)
	h.stopChild(h.apiserver)
	if h.etcd != nil {
		h.etcd.Close()
	}
	_ = os.Remove(filepath.Join(h.dataDir, "harness.pid"))
}

// waitOK polls an API path with the admin identity until it answers 200.
func (h *harness) waitOK(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		select {
		case ex := <-h.exited:
			if !ex.c.stopping {
				return fmt.Errorf("%s exited during start-up (%v); last log lines:\n%s", ex.c.name, ex.err, tailLog(h.logPath(ex.c.name), 30))
			}
		default:
		}
		resp, err := h.client.Get(h.serverURL + path)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("GET %s not OK after %s (last: %s)", path, timeout, last)
}

// writeKubeconfig writes a kubeconfig for one client-certificate identity atomically
// (temp file + rename), so a reader never sees half a file.
func writeKubeconfig(path, server string, caPEM []byte, user string, certPEM, keyPEM []byte) error {
	b64 := base64.StdEncoding.EncodeToString
	content := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: controlplane
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: controlplane
  context:
    cluster: controlplane
    user: %s
current-context: controlplane
`, server, b64(caPEM), user, b64(certPEM), b64(keyPEM), user)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".kubeconfig-*")
	if err != nil {
		return err
	}
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// watchParent turns the death of the starting process into a SIGTERM for ourselves.
func watchParent(signals chan<- os.Signal) {
	parent := os.Getppid()
	for {
		time.Sleep(500 * time.Millisecond)
		if os.Getppid() != parent {
			signals <- syscall.SIGTERM
			return
		}
	}
}

func freePorts(n int) ([]int, error) {
	var ports []int
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func tailLog(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
