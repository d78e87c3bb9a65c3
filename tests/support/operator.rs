//! The operator binary of this build as a child process: its logs, `/metrics`, RSS and
//! CPU, kill and stop.

use super::*;

/// The operator binary, running as a child process with its log in a file.
pub struct Operator {
    child: Option<Child>,
    pub admin: String,
    /// host:port of the metrics server.
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl Operator {
    pub fn start(test: &str, args: &[String]) -> Operator {
        Self::start_with_kubeconfig(test, args, kubeconfig_path())
    }

    /// Starts the operator with another identity's kubeconfig.
    pub fn start_with_kubeconfig(test: &str, args: &[String], kubeconfig: &Path) -> Operator {
        Self::start_program(Path::new(env!("CARGO_BIN_EXE_service-ca-operator")), test, args, kubeconfig)
    }

    /// Starts another build of the operator (e.g. the binary taken from the image).
    pub fn start_program(program: &Path, test: &str, args: &[String], kubeconfig: &Path) -> Operator {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{test}-{}-{}.log", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            // Port 0: the operator picks free ports and logs them.
            .args(["--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            // Tests read /metrics in plain HTTP unless they test the secure server.
            .args((!args.iter().any(|a| a.starts_with("--metrics-secure"))).then_some("--metrics-secure=false"))
            .env("KUBECONFIG", kubeconfig)
            // In the tests (not the benchmarks, which run the defaults), no idle key buffer:
            // tests count the keys made, and a test operator idle for a minute would make
            // 32 more. `serving::idle_buffer` turns it on with the flag, which wins.
            .envs(cfg!(test).then_some(("SERVICE_CA_KEY_BUFFER_IDLE", "0")))
            .env(
                "SERVICE_CA_LOG",
                std::env::var("SERVICE_CA_TEST_LOG").unwrap_or_else(|_| "info,service_ca_operator=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the operator binary");
        eprintln!("operator log: {}", log.display());
        let mut op = Operator { child: Some(child), admin: String::new(), metrics_addr: String::new(), log };
        op.admin = format!("http://{}", op.announced("admin server listening"));
        op.metrics_addr = op.announced("metrics server listening");
        op
    }

    /// The address in the operator's log line announcing one of its servers.
    fn announced(&mut self, server: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logs = self.logs();
            if let Some(addr) = logs
                .lines()
                .find(|l| l.contains(server))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
            {
                return addr.trim_matches('"').to_string();
            }
            assert!(self.running() && Instant::now() < deadline, "the operator did not log '{server}':\n{logs}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/metrics` from an operator started with the plain metrics server (the default
    /// in tests); (status, body).
    pub async fn metrics(&self) -> Option<(u16, String)> {
        http_get(&format!("http://{}/metrics", self.metrics_addr)).await
    }

    /// The `/metrics` page (panics if the operator does not answer).
    pub async fn metrics_page(&self) -> String {
        self.metrics().await.expect("the operator's /metrics").1
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        unsafe_free_signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET an admin path; (status, body).
    pub async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("{}{path}", self.admin)).await
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        eventually(timeout, "operator /readyz", || async {
            self.admin_get("/readyz").await.filter(|(s, _)| *s == 200)
        })
        .await;
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM")
    }

    /// Resident memory now (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces); utime and stime are
    // the 14th and 15th of the line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Sends a signal with the `kill` command (no unsafe code in tests).
pub fn unsafe_free_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
}
