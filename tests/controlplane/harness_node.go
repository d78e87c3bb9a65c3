package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// nodeName is the one hollow node's name; its kubelet authenticates as
// system:node:<nodeName>.
const nodeName = "hollow-node-0"

// nodeInfoFile, in the data dir next to the kubeconfig, tells tests the node's name and
// the kubelet's root directory (tests/support reads it). Absent: an old harness.
const nodeInfoFile = "node.env"

func (h *harness) nodeRoot() string {
	return filepath.Join(h.dataDir, "node", "kubelet")
}

// startNode starts kube-scheduler and the hollow kubelet, waits until the node is
// Ready and schedulable, and writes nodeInfoFile.
func (h *harness) startNode() error {
	var err error
	if h.scheduler, err = h.startChild("kube-scheduler", []string{
		"--kubeconfig=" + h.kubeconfig,
		"--leader-elect=false",
		"--secure-port=0",
		"--v=" + strconv.Itoa(h.verbosity),
	}); err != nil {
		return err
	}
	if err := os.MkdirAll(h.nodeRoot(), 0o755); err != nil {
		return err
	}
	nodeKubeconfig := filepath.Join(h.dataDir, "node", "kubeconfig")
	if err := writeKubeconfig(nodeKubeconfig, h.serverURL, h.pki.caPEM, "system:node:"+h.nodeName, h.pki.nodeCertPEM, h.pki.nodeKeyPEM); err != nil {
		return err
	}
	if h.kubelet, err = h.startChild("kubelet", []string{
		"--kubeconfig=" + nodeKubeconfig,
		"--name=" + h.nodeName,
		"--root-dir=" + h.nodeRoot(),
		"--v=" + strconv.Itoa(h.verbosity),
	}); err != nil {
		return err
	}
	if err := h.waitNodeSchedulable(3 * time.Minute); err != nil {
		return err
	}
	info := fmt.Sprintf("name=%s\nroot=%s\nkubeconfig=%s\n", h.nodeName, h.nodeRoot(), nodeKubeconfig)
	return os.WriteFile(filepath.Join(h.dataDir, nodeInfoFile), []byte(info), 0o644)
}

// waitNodeSchedulable polls the Node until it is Ready and carries no NoSchedule or
// NoExecute taint (node lifecycle lifts the not-ready taint it registered with).
func (h *harness) waitNodeSchedulable(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := "not registered"
	for time.Now().Before(deadline) {
		select {
		case ex := <-h.exited:
			if !ex.c.stopping {
				return fmt.Errorf("%s exited during start-up (%v); last log lines:\n%s", ex.c.name, ex.err, tailLog(h.logPath(ex.c.name), 30))
			}
		default:
		}
		if state, err := h.nodeState(); err != nil {
			last = err.Error()
		} else if state == "" {
			return nil
		} else {
			last = state
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("node %s not schedulable after %s (last: %s); kubelet log:\n%s", h.nodeName, timeout, last, tailLog(h.logPath("kubelet"), 30))
}

// nodeState says why the node is not schedulable yet, or "" when it is.
func (h *harness) nodeState() (string, error) {
	resp, err := h.client.Get(h.serverURL + "/api/v1/nodes/" + h.nodeName)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("HTTP %d", resp.StatusCode), nil
	}
	var node struct {
		Spec struct {
			Taints []struct{ Key, Effect string }
		}
		Status struct {
			Conditions []struct{ Type, Status string }
		}
	}
	if err := json.Unmarshal(body, &node); err != nil {
		return "", err
	}
	ready := false
	for _, c := range node.Status.Conditions {
		ready = ready || (c.Type == "Ready" && c.Status == "True")
	}
	if !ready {
		return "not Ready", nil
	}
	for _, t := range node.Spec.Taints {
		if t.Effect == "NoSchedule" || t.Effect == "NoExecute" {
			return "tainted " + t.Key, nil
		}
	}
	return "", nil
}
