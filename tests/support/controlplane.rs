//! The control plane the tests run against: the shared one (started once per test
//! process, or given by SERVICE_CA_TEST_KUBECONFIG), a private one, and clients for it.

use super::*;

/// The admin kubeconfig of the test control plane.
pub fn kubeconfig_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("SERVICE_CA_TEST_KUBECONFIG") {
        Some(path) => PathBuf::from(path),
        None => start_control_plane(),
    })
}

/// Starts a control plane for this test process (plain `cargo test`); `make test`
/// starts one for the whole run instead and sets SERVICE_CA_TEST_KUBECONFIG.
fn start_control_plane() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("controlplane-{}", std::process::id()));
    // Kept for the life of the process; the harness exits when this process does.
    static HARNESS: OnceLock<std::sync::Mutex<Child>> = OnceLock::new();
    let child = launch_harness(&dir, &[]);
    let _ = HARNESS.set(std::sync::Mutex::new(child));
    dir.join("kubeconfig")
}

/// The harness binary (built by tests/controlplane/build.sh).
fn harness_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("tests/controlplane/build.sh"))
        .arg("--path")
        .output()
        .expect("run tests/controlplane/build.sh");
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        bin.is_file(),
        "the test control plane is not built ({}).\nRun the tests with `make test`, which builds it (10-25 minutes the first time), \
         or build it with `tests/controlplane/build.sh`, or point SERVICE_CA_TEST_KUBECONFIG at a running one (`make controlplane`).",
        bin.display()
    );
    bin
}

/// Starts a harness with its data in `dir` and `extra` arguments, and waits for READY.
fn launch_harness(dir: &Path, extra: &[&str]) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let log = std::fs::File::create(dir.join("harness.out")).unwrap();
    let child = Command::new(harness_binary())
        .args(["run", "--exit-with-parent", "--data-dir"])
        .arg(dir)
        .args(extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the control plane harness");
    wait_for_line(dir, "READY", Duration::from_secs(300));
    child
}

/// Waits until the harness printed a line starting with `prefix` (after `skip` lines).
fn wait_for_line(dir: &Path, prefix: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = std::fs::read_to_string(dir.join("harness.out")).unwrap_or_default();
        if out.lines().any(|l| l.starts_with(prefix)) {
            return;
        }
        assert!(Instant::now() < deadline && !out.contains("controlplane:"), "control plane: no {prefix} line:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A control plane of one test's own, for tests that disturb it (an API server
/// outage). Stopped when dropped. Without a node (kube-scheduler, hollow kubelet): the
/// tests that need their own API server run no pods, and the node's start (until it is
/// Ready) took a third of the control plane's.
pub struct PrivateControlPlane {
    child: Child,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl PrivateControlPlane {
    pub fn start(name: &str) -> PrivateControlPlane {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("controlplane-{name}-{}", std::process::id()));
        let child = launch_harness(&dir, &["--node=false"]);
        PrivateControlPlane { kubeconfig: dir.join("kubeconfig"), dir, child }
    }

    /// Stops kube-apiserver (etcd keeps the data); returns once it is down.
    pub fn stop_apiserver(&self) {
        unsafe_free_signal(self.child.id(), "USR1");
        wait_for_line(&self.dir, "APISERVER STOPPED", Duration::from_secs(30));
    }

    /// Starts kube-apiserver again; returns once it is ready.
    pub fn start_apiserver(&self) {
        unsafe_free_signal(self.child.id(), "USR2");
        wait_for_line(&self.dir, "APISERVER STARTED", Duration::from_secs(120));
    }
}

impl Drop for PrivateControlPlane {
    fn drop(&mut self) {
        unsafe_free_signal(self.child.id(), "TERM");
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The control plane's data directory (logs, harness.pid).
pub fn controlplane_dir() -> PathBuf {
    kubeconfig_path().parent().unwrap().to_path_buf()
}

pub async fn client() -> Client {
    client_for(kubeconfig_path()).await
}

pub async fn client_for(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read the test kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// A client of the test cluster that acts as `user` in `groups` (the admin
/// impersonates them; RBAC applies to them, not to the admin).
pub async fn client_as(user: &str, groups: &[&str]) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("read the test kubeconfig");
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig");
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    Client::try_from(config).expect("client")
}
