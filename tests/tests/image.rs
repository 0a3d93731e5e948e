//! The Kube-OVN gateway image, checked without building it (no container
//! engine here, and no registry for its base): every input the
//! Containerfile copies exists or is what the workspace builds, its base is
//! pinned, and every path Kube-OVN's controller runs in its gateway pods is
//! in the image directory, executable, with a shebang. Needs no root.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn containerfile() -> String {
    std::fs::read_to_string(repo().join("deploy/kube-ovn/Containerfile")).expect("Containerfile")
}

#[test]
fn every_input_of_the_containerfile_exists_or_is_built_here() {
    let text = containerfile();
    let copies: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(words.len(), 2, "COPY <source> <destination>: {rest}");
            (words[0].to_owned(), words[1].to_owned())
        })
        .collect();
    assert!(copies.len() >= 3, "{copies:?}");
    for (source, destination) in &copies {
        assert!(
            !destination.starts_with("/usr/local/sbin"),
            "Kube-OVN mounts an emptyDir over /usr/local/sbin: {destination}"
        );
        if let Some(binary) = source.strip_prefix("target/release/") {
            // Built by `cargo build --release -p egress-agent`.
            let manifest =
                std::fs::read_to_string(repo().join(binary).join("Cargo.toml")).expect("manifest");
            assert!(
                manifest.contains(&format!("name = \"{binary}\"")),
                "{binary}"
            );
            assert!(
                repo().join(binary).join("src/main.rs").exists(),
                "{binary} has a main"
            );
        } else {
            assert!(
                repo().join(source).exists(),
                "COPY source {source} is missing"
            );
        }
    }
}

#[test]
fn the_base_image_is_named_and_pinned() {
    let text = containerfile();
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 1, "{from:?}");
    let image = from[0].trim_start_matches("FROM ").trim();
    assert!(
        image.starts_with("docker.io/library/debian:bookworm-"),
        "{image}"
    );
    let tag = image.rsplit(':').next().unwrap_or_default();
    let dated = tag
        .strip_prefix("bookworm-")
        .and_then(|t| t.strip_suffix("-slim"))
        .is_some_and(|date| date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()));
    assert!(
        dated || image.contains("@sha256:"),
        "a floating tag: {image}"
    );
}

#[test]
fn every_path_kube_ovn_runs_is_there_and_executable() {
    let dir = repo().join("deploy/kube-ovn/image");
    for script in [
        "init-vpc-egress-gateway.sh",
        "nat-gateway.sh",
        "kube-ovn-bfdd-supervisor",
        "start-bfdd.sh",
        "bfdd-prestart.sh",
        "bfdd-healthcheck.sh",
        "bfdd-control",
    ] {
        let path = dir.join(script);
        let meta = std::fs::metadata(&path).unwrap_or_else(|err| panic!("{script}: {err}"));
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "{script} is not executable"
        );
        let text = std::fs::read_to_string(&path).expect("script text");
        assert!(text.starts_with("#!"), "{script} has no shebang");
    }
}
