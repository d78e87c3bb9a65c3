//! The container image, built without a Docker engine by scripts/image.sh (`make
//! image`, which `make test` runs first) and checked here: its layout is the
//! Dockerfile's (the binary and the glibc libraries it loads, non-root numeric user, no
//! shell), its entrypoint runs inside the image root (`buildah run --isolation
//! chroot`), the operator runs from the image against the control plane (`buildah run
//! --network host`, kubeconfig mounted), and it loads a PKCS#11 module mounted into it
//! (SoftHSM2, as a user mounts a vendor's) and keeps the CA key in that token.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::hsm::{MODULE, SoftHsm, assert_key_in_token};
use crate::support::{Env, Operator, T, eventually};

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

    // Contents: the binary and the four glibc libraries it loads, nothing else (no shell).
    let ctr = Container::new();
    let mount = PathBuf::from(buildah(&["mount", &ctr.0]));
    let listing = files(&mount);
    let mut names: Vec<&str> =
        listing.iter().filter(|f| f.starts_with("lib")).map(|f| f.rsplit('/').next().unwrap()).collect();
    names.sort();
    assert_eq!(names, IMAGE_LIBRARIES, "{listing:?}");
    assert_eq!(listing.len(), 5, "the binary and its libraries only: {listing:?}");
    assert!(listing.contains(&"service-ca-operator".to_string()), "{listing:?}");
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
    let kube = kube_dir(&env);
    let mut args = run_args(&kube, &[], &ctr);
    args.extend(env.operator_args());
    let op = Graceful(Operator::start_program(Path::new("buildah"), "image", &args, &env.kubeconfig));
    op.0.wait_ready(T).await;
    env.annotated_service("web", "web-tls", false).await;
    let secret = env.serving_secret("web-tls", T).await;
    assert!(crate::support::data(&secret, "tls.crt").contains("BEGIN CERTIFICATE"));
    drop(op);
    let _ = std::fs::remove_dir_all(&kube);
}

/// The libraries the image ships (the binary's, as ldd names them).
const IMAGE_LIBRARIES: [&str; 4] = ["ld-linux-x86-64.so.2", "libc.so.6", "libgcc_s.so.1", "libm.so.6"];

/// A copy of the test's kubeconfig readable by the image's user 65532 (test-only).
fn kube_dir(env: &Env) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let kube = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("image-kube-{}", env.run));
    std::fs::create_dir_all(&kube).unwrap();
    std::fs::copy(&env.kubeconfig, kube.join("kubeconfig")).unwrap();
    std::fs::set_permissions(&kube, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(kube.join("kubeconfig"), std::fs::Permissions::from_mode(0o644)).unwrap();
    kube
}

/// `buildah run` of the operator in `ctr` with the kubeconfig at /kube, `extra`
/// options (volumes, variables), up to and including `run`.
fn run_args(kube: &Path, extra: &[String], ctr: &Container) -> Vec<String> {
    let mut args: Vec<String> = ["--storage-driver", "vfs", "run", "--isolation", "chroot", "--network", "host"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend([
        "-v".into(),
        format!("{}:/kube:ro", kube.display()),
        "--env".into(),
        "KUBECONFIG=/kube/kubeconfig".into(),
    ]);
    args.extend(extra.iter().cloned());
    args.extend([ctr.0.clone(), "--".into(), "/service-ca-operator".into(), "run".into()]);
    args
}

/// The PKCS#11 module as a user mounts a vendor's: the module and the libraries it
/// needs beyond the image's in one directory (mounted at /pkcs11, LD_LIBRARY_PATH
/// pointing there). Returns the files and their total size.
fn module_dir(dir: &Path) -> (Vec<String>, u64) {
    std::fs::create_dir_all(dir).unwrap();
    let ldd = Command::new("ldd").arg(MODULE).output().unwrap();
    let mut files = vec![PathBuf::from(MODULE)];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) else { continue };
        let name = Path::new(path).file_name().unwrap().to_string_lossy().to_string();
        if !IMAGE_LIBRARIES.contains(&name.as_str()) {
            files.push(PathBuf::from(path));
        }
    }
    let (mut names, mut size) = (Vec::new(), 0);
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        size += std::fs::copy(std::fs::canonicalize(&file).unwrap(), dir.join(&name)).unwrap();
        names.push(name);
    }
    (names, size)
}

#[tokio::test]
async fn the_image_loads_a_mounted_pkcs11_module_and_keeps_the_ca_key_in_its_token() {
    let env = Env::new("image-hsm").await;
    let hsm = SoftHsm::new("image-hsm");
    let kube = kube_dir(&env);
    let module = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("image-pkcs11-{}", env.run));
    let (files, size) = module_dir(&module);
    // The token's files are written by the image's user 65532 (a test-only token).
    let chmod = Command::new("chmod").args(["-R", "a+rwX"]).arg(&hsm.dir).status().unwrap();
    assert!(chmod.success());
    let hsm_dir = hsm.dir.display().to_string();
    let extra: Vec<String> = vec![
        "-v".into(),
        format!("{}:/pkcs11:ro", module.display()),
        "-v".into(),
        format!("{hsm_dir}:{hsm_dir}"),
        "--env".into(),
        "LD_LIBRARY_PATH=/pkcs11".into(),
        "--env".into(),
        format!("SOFTHSM2_CONF={}", hsm.conf.display()),
    ];
    let ctr = Container::new();
    let mut args = run_args(&kube, &extra, &ctr);
    args.extend(env.operator_args());
    let flags = hsm.flags(&hsm.pin_file());
    args.extend(flags.into_iter().map(|f| if f == MODULE { "/pkcs11/libsofthsm2.so".to_string() } else { f }));
    let started = std::time::Instant::now();
    let op = Graceful(Operator::start_program(Path::new("buildah"), "image-hsm", &args, &env.kubeconfig));
    op.0.wait_ready(T).await;
    let ready_after = started.elapsed();
    // Read until present: once, right after /readyz answered 200, this GET was refused
    // with 404 although the operator had logged the Secret created (not explained yet).
    let ca =
        eventually(T, "signing-key", || async { env.op_secrets().get_opt("signing-key").await.ok().flatten() }).await;
    assert_key_in_token(&ca, &hsm);
    assert_eq!(hsm.private_keys().len(), 1, "the CA key was generated in the token, from the image");
    env.annotated_service("web", "web-tls", false).await;
    let leaf = env.serving_secret("web-tls", T).await;
    assert_eq!(crate::support::certs::leaf_aki(&leaf), crate::support::certs::ca_ski(&ca), "signed in the token");
    drop(op);
    let _ = std::fs::remove_dir_all(&kube);
    let _ = std::fs::remove_dir_all(&module);
    println!(
        "the image loaded /pkcs11/libsofthsm2.so (mounted: {files:?}, {} KiB) and was ready after {ready_after:?}; a leaf signed in the token",
        size / 1024
    );
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
