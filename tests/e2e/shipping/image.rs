//! The container image, built without a Docker engine by scripts/image.sh (`make
//! image`, which `make test` runs first) and checked here: its layout is the
//! Dockerfile's (one static binary, non-root numeric user, no shell), its entrypoint
//! runs inside the image root (`buildah run --isolation chroot`), and the operator runs
//! from the image against the control plane (`buildah run --network host`, kubeconfig
//! mounted).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{Env, Operator, T};

fn image() -> String {
    std::env::var("SERVICE_CA_TEST_IMAGE").unwrap_or_else(|_| "localhost/service-ca-operator:dev".into())
}

fn buildah(args: &[&str]) -> String {
    let out = Command::new("buildah")
        .arg("--storage-driver")
        .arg("vfs")
        .args(args)
        .env("BUILDAH_ISOLATION", "chroot")
        .output()
        .unwrap_or_else(|e| panic!("cannot run buildah ({e}): apt-get install -y buildah, then `make image`"));
    assert!(
        out.status.success(),
        "buildah {args:?} failed (is the image built? `make image` builds {}):\n{}",
        image(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A working container of the image, removed when dropped.
struct Container(String);

impl Container {
    fn new() -> Container {
        Container(buildah(&["from", "--pull-never", &image()]))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["--storage-driver", "vfs", "rm", &self.0]).output();
    }
}

/// Every file under `root` that is not a directory, relative. (`buildah run` adds empty
/// mount points such as dev/ and proc/ to a working container.)
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path.clone());
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn image_has_the_dockerfile_layout_and_runs_the_operator_from_its_root() {
    // Config: what the Dockerfile's runtime stage says.
    let config: Value = serde_json::from_str(&buildah(&["inspect", "--type", "image", &image()])).unwrap();
    let oci = &config["OCIv1"]["config"];
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").unwrap()..];
    assert!(runtime.starts_with("\nFROM scratch"), "{runtime}");
    let user = oci["User"].as_str().unwrap();
    assert!(runtime.contains(&format!("USER {user}")), "image user {user} vs Dockerfile:\n{runtime}");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("numeric user");
    assert!(uid >= 1000, "non-root: {user}");
    assert_eq!(oci["Entrypoint"], serde_json::json!(["/service-ca-operator"]));
    assert!(runtime.contains(r#"ENTRYPOINT ["/service-ca-operator"]"#));
    assert_eq!(oci["Cmd"], serde_json::json!(["run"]));
    assert!(runtime.contains(r#"CMD ["run"]"#));
    for port in ["8080/tcp", "8443/tcp"] {
        assert!(oci["ExposedPorts"].get(port).is_some(), "{port} not exposed: {}", oci["ExposedPorts"]);
    }
    assert!(runtime.contains("EXPOSE 8080 8443"), "{runtime}");

    // Contents: the binary and nothing else (no shell, no libraries).
    let ctr = Container::new();
    let mount = PathBuf::from(buildah(&["mount", &ctr.0]));
    let listing = files(&mount);
    assert_eq!(listing, ["service-ca-operator"], "the image holds only the binary");
    assert!(!mount.join("bin/sh").exists());
    buildah(&["umount", &ctr.0]);

    // The entrypoint runs inside the image's root, as its user.
    let version = buildah(&["run", "--isolation", "chroot", &ctr.0, "--", "/service-ca-operator", "--version"]);
    assert_eq!(version, format!("service-ca-operator {}", env!("CARGO_PKG_VERSION")));
    let no_shell = Command::new("buildah")
        .args(["--storage-driver", "vfs", "run", "--isolation", "chroot", &ctr.0, "--", "/bin/sh", "-c", "true"])
        .output()
        .unwrap();
    assert!(!no_shell.status.success(), "/bin/sh must not run in the image");

    // The operator runs from the image, in its root and as its user, against the
    // control plane: `buildah run --isolation chroot --network host` with the
    // kubeconfig mounted read-only.
    let env = Env::new("image").await;
    let kube = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("image-kube-{}", env.run));
    std::fs::create_dir_all(&kube).unwrap();
    std::fs::copy(&env.kubeconfig, kube.join("kubeconfig")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kube, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Readable by the image's user 65532 (a test-only copy, removed below).
    std::fs::set_permissions(kube.join("kubeconfig"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let volume = format!("{}:/kube:ro", kube.display());
    let mut args: Vec<String> = ["--storage-driver", "vfs", "run", "--isolation", "chroot", "--network", "host"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(["-v".into(), volume, "--env".into(), "KUBECONFIG=/kube/kubeconfig".into(), ctr.0.clone()]);
    args.extend(["--".into(), "/service-ca-operator".into(), "run".into()]);
    args.extend(env.operator_args());
    let op = Graceful(Operator::start_program(Path::new("buildah"), "image", &args, &env.kubeconfig));
    op.0.wait_ready(T).await;
    env.annotated_service("web", "web-tls", false).await;
    let secret = env.serving_secret("web-tls", T).await;
    assert!(crate::support::data(&secret, "tls.crt").contains("BEGIN CERTIFICATE"));
    drop(op);
    let _ = std::fs::remove_dir_all(&kube);
}

/// Stops `buildah run` with SIGTERM, on which it kills the operator it runs (a SIGKILL
/// would give buildah no chance to, and could leave the operator running).
struct Graceful(Operator);

impl Drop for Graceful {
    fn drop(&mut self) {
        let status = self.0.stop();
        eprintln!("operator in the image stopped: {status:?}");
    }
}
