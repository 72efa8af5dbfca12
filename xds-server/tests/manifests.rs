//! A watched manifest directory feeding connected clients.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mesh_api::ResourceType;
use tokio_util::sync::CancellationToken;
use tracing::instrument::WithSubscriber;
use xds_server::object::MAX_DOCUMENTS;
use xds_server::source::ManifestDir;
use xds_server::{ConfigSource, MeshConfig, Store, parse_manifest};

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  clusterIP: 10.96.0.10
  selector:
    app: echo
  ports:
  - port: 80
    targetPort: 8080
";

#[tokio::test]
async fn edits_reach_connected_clients_and_broken_files_keep_what_was_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("service.yaml"), SERVICE).expect("write");
    std::fs::create_dir(dir.path().join("pods")).expect("mkdir");
    let pods = dir.path().join("pods/echo.yaml");
    std::fs::write(
        &pods,
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");

    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(dir.path()).poll_interval(Duration::from_millis(50));
    let problems = source.problems();
    source.sync(&store).expect("first read");
    assert_eq!(store.stats().workloads, 1);
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(Box::new(source).run(store.clone(), shutdown.clone()));

    let server = serve(&store).await;
    let mut client = AdsClient::open(
        server.local_addr(),
        vec![wildcard(ADDRESS, BTreeMap::new())],
    )
    .await;
    let mut view = View::default();
    let echo = "Kubernetes//Pod/default/echo-1";
    client
        .collect_until(&mut view, |v| {
            v.workload(echo).is_some_and(|w| w.services.len() == 1)
        })
        .await;

    // Edit: the pod leaves the service, a second pod appears.
    let edited = format!(
        "{}---\n{}",
        pod("default", "echo-1", "10.0.0.1", &[("app", "other")]),
        pod("default", "echo-2", "10.0.0.2", &[("app", "echo")])
    );
    std::fs::write(&pods, edited).expect("write");
    client
        .collect_until(&mut view, |v| {
            v.workload(echo).is_some_and(|w| w.services.is_empty())
                && v.workload("Kubernetes//Pod/default/echo-2").is_some()
        })
        .await;

    // A broken file is reported; what it defined before stays.
    std::fs::write(
        &pods,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo-1\n  labels: [oops]\n",
    )
    .expect("write");
    eventually("the broken file is reported", || {
        !problems.current().is_empty()
    })
    .await;
    let reported = problems.current();
    assert_eq!(reported[0].path, pods);
    assert!(
        reported[0].problems[0].contains("metadata.labels"),
        "{:?}",
        reported[0].problems
    );
    assert_eq!(store.stats().workloads, 2, "nothing dropped");

    // Fixed again: the problem clears. Removing the file withdraws its pods.
    std::fs::write(
        &pods,
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");
    eventually("the problem clears", || problems.current().is_empty()).await;
    client
        .collect_until(&mut view, |v| {
            v.removed
                .iter()
                .any(|n| n == "Kubernetes//Pod/default/echo-2")
        })
        .await;
    std::fs::remove_file(&pods).expect("rm");
    client
        .collect_until(&mut view, |v| v.removed.iter().any(|n| n == echo))
        .await;
    assert_eq!(store.stats().workloads, 0);

    shutdown.cancel();
    watcher.await.expect("join").expect("watcher");
}

#[test]
fn an_object_defined_twice_stays_until_no_file_defines_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = dir.path().join("one.yaml");
    let two = dir.path().join("two.yml");
    std::fs::write(&one, SERVICE).expect("write");
    std::fs::write(&two, SERVICE.replace("10.96.0.10", "10.96.0.11")).expect("write");
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(dir.path());
    source.sync(&store).expect("read");
    assert_eq!(store.stats().services, 1);

    std::fs::remove_file(&two).expect("rm");
    source.sync(&store).expect("read");
    assert_eq!(store.stats().services, 1, "one.yaml still defines it");
    std::fs::remove_file(&one).expect("rm");
    source.sync(&store).expect("read");
    assert_eq!(store.stats().services, 0);
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new("/nonexistent/podless-manifests");
    let err = source.sync(&store).expect_err("missing");
    assert!(
        err.to_string().contains("/nonexistent/podless-manifests"),
        "{err}"
    );
}

/// What a source logs, captured.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }

    /// Log lines containing `needle`.
    fn count(&self, needle: &str) -> usize {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }
}

fn service(name: &str, ip: &str) -> String {
    SERVICE
        .replace("name: echo", &format!("name: {name}"))
        .replace("10.96.0.10", ip)
}

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

fn files(source: &ManifestDir) -> Vec<PathBuf> {
    source.files().map(Path::to_path_buf).collect()
}

/// Syncs on another thread, failing the test if the walk does not end within
/// `seconds` (a ceiling for a runaway walk, not a timing assertion).
fn sync_within(source: ManifestDir, store: &Store, seconds: u64) -> ManifestDir {
    let (done, finished) = std::sync::mpsc::channel();
    let store = store.clone();
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    std::thread::spawn(move || {
        let mut source = source;
        let result = tracing::dispatcher::with_default(&dispatch, || source.sync(&store));
        let _ = done.send((source, result));
    });
    let (source, result) = finished
        .recv_timeout(Duration::from_secs(seconds))
        .expect("the walk never ended");
    result.expect("sync");
    source
}

#[test]
fn a_symlink_loop_is_read_once_reported_once_and_the_rest_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m");
    std::fs::create_dir_all(m.join("sub")).expect("mkdir");
    std::fs::write(
        m.join("pod.yaml"),
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");
    // A normal manifest beside the loop.
    std::fs::write(m.join("sub/service.yaml"), SERVICE).expect("write");
    // The repro: `ln -s .. m/sub/up; ln -s $PWD/m m/self`, one link at a time.
    std::os::unix::fs::symlink("..", m.join("sub/up")).expect("symlink");

    let logs = Logs::default();
    let _logging = tracing::subscriber::set_default(logs.subscriber());
    let store = Store::new(MeshConfig::default());
    let source = ManifestDir::new(&m);
    let problems = source.problems();
    let source = sync_within(source, &store, 20);
    let expected = vec![m.join("pod.yaml"), m.join("sub/service.yaml")];
    assert_eq!(files(&source), expected, "each file read once, at its path");

    std::os::unix::fs::symlink(&m, m.join("self")).expect("symlink");
    let mut source = sync_within(source, &store, 20);
    assert_eq!(files(&source), expected);
    assert_eq!(store.stats().workloads, 1);
    assert_eq!(store.stats().services, 1, "the manifest beside the loop");
    let reported: BTreeMap<PathBuf, Vec<String>> = problems
        .current()
        .into_iter()
        .map(|problem| (problem.path, problem.problems))
        .collect();
    assert_eq!(
        reported.keys().collect::<Vec<_>>(),
        [&m.join("self"), &m.join("sub/up")]
    );
    for lines in reported.values() {
        assert!(lines[0].contains("a loop, not followed"), "{lines:?}");
    }

    // Polling on: nothing is read or reported again.
    for _ in 0..10 {
        source = sync_within(source, &store, 20);
    }
    assert_eq!(logs.count("manifest loaded"), 2, "{}", logs.text());
    assert_eq!(logs.count("a loop, not followed"), 2, "{}", logs.text());

    // A new file is picked up; removing the loops clears their problems.
    std::fs::write(
        m.join("sub/other.yaml"),
        pod("default", "echo-2", "10.0.0.2", &[("app", "echo")]),
    )
    .expect("write");
    std::fs::remove_file(m.join("self")).expect("rm");
    std::fs::remove_file(m.join("sub/up")).expect("rm");
    let _source = sync_within(source, &store, 20);
    assert_eq!(store.stats().workloads, 2);
    assert!(problems.current().is_empty(), "{:?}", problems.current());
}

#[test]
fn symlinks_to_files_and_to_directories_elsewhere_are_followed_configmap_style() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m");
    // A ConfigMap volume: `pods.yaml -> ..data/pods.yaml`, `..data -> ..<ts>`.
    let volume = m.join("cm");
    std::fs::create_dir_all(volume.join("..2024_01_01")).expect("mkdir");
    std::fs::write(
        volume.join("..2024_01_01/pods.yaml"),
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");
    std::os::unix::fs::symlink("..2024_01_01", volume.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/pods.yaml", volume.join("pods.yaml")).expect("symlink");
    // A directory elsewhere, linked in.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    std::fs::write(elsewhere.join("service.yaml"), SERVICE).expect("write");
    std::os::unix::fs::symlink(&elsewhere, m.join("shared")).expect("symlink");
    // And a hidden directory, not read.
    std::fs::create_dir(m.join(".git")).expect("mkdir");
    std::fs::write(
        m.join(".git/pod.yaml"),
        pod("default", "x", "10.0.0.9", &[]),
    )
    .expect("write");

    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(&m);
    source.sync(&store).expect("sync");
    assert_eq!(
        files(&source),
        [volume.join("pods.yaml"), m.join("shared/service.yaml")]
    );
    assert_eq!(store.stats().workloads, 1);
    assert_eq!(store.stats().services, 1);
    assert!(source.problems().current().is_empty());

    // The kubelet's update: a new timestamped directory, `..data` swapped.
    std::fs::create_dir(volume.join("..2024_01_02")).expect("mkdir");
    std::fs::write(
        volume.join("..2024_01_02/pods.yaml"),
        format!(
            "{}---\n{}",
            pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
            pod("default", "echo-2", "10.0.0.2", &[("app", "echo")])
        ),
    )
    .expect("write");
    std::os::unix::fs::symlink("..2024_01_02", volume.join("..data_tmp")).expect("symlink");
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).expect("swap");
    std::fs::remove_dir_all(volume.join("..2024_01_01")).expect("rm");
    source.sync(&store).expect("sync");
    assert_eq!(store.stats().workloads, 2);
    assert_eq!(files(&source).len(), 2);
}

#[test]
fn the_walk_is_bounded_in_depth_and_files_and_a_cut_walk_drops_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path();
    std::fs::create_dir_all(m.join("a/b/c")).expect("mkdir");
    std::fs::write(m.join("a/b/c/deep.yaml"), service("deep", "10.96.0.99")).expect("write");
    for (index, name) in ["f1", "f2", "f3"].iter().enumerate() {
        std::fs::write(
            m.join(format!("{name}.yaml")),
            service(name, &format!("10.96.0.{}", index + 1)),
        )
        .expect("write");
    }
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(m).max_depth(2).max_files(3);
    let problems = source.problems();
    source.sync(&store).expect("sync");
    assert_eq!(store.stats().services, 3, "a/b/c is three levels down");
    let reported = problems.current();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].path, m.join("a/b/c"));
    assert!(
        reported[0].problems[0].contains("more than 2 directories below"),
        "{reported:?}"
    );

    // Two more files, read before the others: the walk stops at three files,
    // says so, and the files it no longer reaches keep what they provided.
    std::fs::write(m.join("0a.yaml"), service("new-a", "10.96.0.4")).expect("write");
    std::fs::write(m.join("0b.yaml"), service("new-b", "10.96.0.5")).expect("write");
    source.sync(&store).expect("sync");
    assert_eq!(store.stats().services, 5, "nothing lost");
    let root_problem = problems
        .current()
        .into_iter()
        .find(|problem| problem.path == m)
        .expect("the limit is reported");
    assert!(
        root_problem.problems[0].contains("more than 3 manifest files"),
        "{root_problem:?}"
    );
    // A file beyond the limit that is removed is gone.
    std::fs::remove_file(m.join("f3.yaml")).expect("rm");
    source.sync(&store).expect("sync");
    assert_eq!(store.stats().services, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_reported_with_backoff_keeps_what_it_provided_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m");
    std::fs::create_dir(&m).expect("mkdir");
    std::fs::write(
        m.join("pod.yaml"),
        pod("default", "echo-1", "10.0.0.1", &[("app", "echo")]),
    )
    .expect("write");
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(&m).poll_interval(Duration::from_millis(10));
    source.sync(&store).expect("first read");
    let logs = Logs::default();
    let shutdown = CancellationToken::new();
    let watcher = tokio::spawn(
        Box::new(source)
            .run(store.clone(), shutdown.clone())
            .with_subscriber(logs.subscriber()),
    );

    std::fs::rename(&m, dir.path().join("moved")).expect("mv");
    // About 250 polls fail in 2.5 s: reported at once, after 1 s and after 3 s
    // at most.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reports = logs.count("manifest directory");
    assert!((1..=3).contains(&reports), "{reports}: {}", logs.text());
    assert_eq!(store.stats().workloads, 1, "what it provided stays");

    // Back, with one more pod: read, and the recovery said once.
    std::fs::rename(dir.path().join("moved"), &m).expect("mv");
    std::fs::write(
        m.join("more.yaml"),
        pod("default", "echo-2", "10.0.0.2", &[("app", "echo")]),
    )
    .expect("write");
    eventually("the directory is read again", || {
        store.stats().workloads == 2
    })
    .await;
    eventually("the recovery is logged", || {
        logs.count("manifest directory readable again") == 1
    })
    .await;
    shutdown.cancel();
    watcher.await.expect("join").expect("watcher");
}

#[test]
fn more_documents_than_the_limit_is_a_clear_sentence_naming_the_file() {
    let namespaces = |count: usize| {
        (0..count)
            .map(|index| {
                format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{index}}}\n")
            })
            .collect::<Vec<_>>()
            .join("---\n")
    };
    assert_eq!(MAX_DOCUMENTS, 1024);
    let at_limit = parse_manifest(&namespaces(MAX_DOCUMENTS)).expect("at the limit");
    assert_eq!(at_limit.objects.len(), MAX_DOCUMENTS);
    let err = parse_manifest(&namespaces(MAX_DOCUMENTS + 1)).expect_err("over the limit");
    assert!(
        err.to_string()
            .contains("the file has more than 1024 YAML documents"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, namespaces(MAX_DOCUMENTS + 1)).expect("write");
    std::fs::write(dir.path().join("service.yaml"), SERVICE).expect("write");
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(dir.path());
    source.sync(&store).expect("sync");
    let reported = source.problems().current();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].path, big);
    assert_eq!(
        reported[0].problems,
        [
            "the file has more than 1024 YAML documents, the most one manifest file may hold: \
          split it into several files"
        ]
    );
    assert_eq!(store.stats().services, 1, "the other file is served");
}

#[test]
fn a_bad_document_skips_only_its_object_and_keeps_its_last_good_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pods.yaml");
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            pod("default", "a", "10.0.0.1", &[("app", "echo")]),
            pod("default", "b", "10.0.0.2", &[("app", "echo")])
        ),
    )
    .expect("write");
    let store = Store::new(MeshConfig::default());
    let mut source = ManifestDir::new(dir.path());
    let problems = source.problems();
    source.sync(&store).expect("sync");
    let version = |name: &str| store.resource_version(ResourceType::Address, &uid(name));
    let (a1, b1) = (version("a"), version("b"));
    assert!(a1.is_some() && b1.is_some());

    // `a` edited, `b` broken, `c` new; an empty document first, as templating
    // tools leave them.
    let broken_b = pod("default", "b", "10.0.0.2", &[("app", "echo")])
        .replace("  containers:\n", "  containers: 7\n  x-was-containers:\n");
    std::fs::write(
        &file,
        format!(
            "---\n# Source: chart/templates/empty.yaml\n---\n{}---\n{}---\n{}",
            pod("default", "a", "10.0.0.1", &[("app", "other")]),
            broken_b,
            pod("default", "c", "10.0.0.3", &[("app", "echo")])
        ),
    )
    .expect("write");
    source.sync(&store).expect("sync");
    assert_ne!(version("a"), a1, "the good documents are applied");
    assert!(version("c").is_some(), "the good documents are applied");
    assert_eq!(version("b"), b1, "the bad one's last good version stays");
    let reported = problems.current();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(reported[0].path, file);
    assert_eq!(reported[0].problems.len(), 1, "{reported:?}");
    let problem = &reported[0].problems[0];
    assert!(
        problem.starts_with("document 3: Pod default/b: spec.containers: "),
        "{problem}"
    );
    assert!(
        problem.ends_with("; the version loaded before stays"),
        "{problem}"
    );

    // Fixed, without `b`: it goes, and the problem clears.
    std::fs::write(
        &file,
        format!(
            "{}---\n{}",
            pod("default", "a", "10.0.0.1", &[("app", "other")]),
            pod("default", "c", "10.0.0.3", &[("app", "echo")])
        ),
    )
    .expect("write");
    source.sync(&store).expect("sync");
    assert_eq!(version("b"), None);
    assert_eq!(store.stats().workloads, 2);
    assert!(problems.current().is_empty());
}
