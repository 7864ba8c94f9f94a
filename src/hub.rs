//! Finding a model: a folder path, a Hugging Face hub id already in the local hub cache, or the
//! default model (`LLADA_MODEL`, else the small model shipped in the repository).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the default model (a folder or a hub id).
pub const MODEL_ENV: &str = "LLADA_MODEL";

/// The small model shipped with the source tree (`models/llada-tiny-kjv`).
pub fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llada-tiny-kjv")
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Whether `s` looks like a hub id (`owner/name`, no other path syntax).
fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot folder of hub id `id` in the local cache (`models--owner--name/snapshots/REV`,
/// REV from `refs/main`, else the only or newest snapshot).
pub fn hub_snapshot(id: &str) -> Result<PathBuf> {
    let cache = hub_cache()
        .ok_or_else(|| Error::setting("model", id, "no Hugging Face cache folder (set HF_HOME)"))?;
    snapshot_in(&cache, id)
}

/// Whether `rev` (the content of a `refs/` file) is a revision token: what the hub writes there is
/// a commit hash; anything with path syntax (`/`, `..`) is not.
fn is_revision(rev: &str) -> bool {
    (1..=128).contains(&rev.len()) && rev.chars().all(|c| c.is_ascii_alphanumeric())
}

/// The snapshot of hub id `id` in the hub cache folder `cache`, confined to the repository's
/// `snapshots` folder: `refs/main` must hold a revision token (a commit hash), and a snapshot
/// whose real path (symlinks resolved) lies outside `snapshots` is refused.
pub fn snapshot_in(cache: &Path, id: &str) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let not_cached = || {
        Error::setting(
            "model",
            id,
            format!(
                "not found in the local Hugging Face cache ({}); llada does not download: fetch it first, e.g. `huggingface-cli download {id}`, or pass a folder",
                repo.display()
            ),
        )
    };
    if !repo.is_dir() {
        return Err(not_cached());
    }
    let snapshots = repo.join("snapshots");
    let real_snapshots = std::fs::canonicalize(&snapshots).map_err(|_| not_cached())?;
    let confined = |p: &Path| {
        std::fs::canonicalize(p)
            .is_ok_and(|r| r.starts_with(&real_snapshots) && r != real_snapshots)
    };
    let refs_main = repo.join("refs/main");
    // absent: the newest snapshot below; present, it must be a small regular file (a FIFO hung)
    if std::fs::symlink_metadata(&refs_main).is_ok() {
        let bytes = crate::error::read_regular_file(&refs_main, 4096)?;
        let rev = String::from_utf8_lossy(&bytes);
        let rev = rev.trim();
        if !is_revision(rev) {
            return Err(Error::setting(
                "model",
                id,
                format!(
                    "{} holds {:?}, which is not a revision (a commit hash of letters and digits)",
                    refs_main.display(),
                    rev.chars().take(80).collect::<String>()
                ),
            ));
        }
        let p = snapshots.join(rev);
        if p.is_dir() {
            if !confined(&p) {
                return Err(Error::setting(
                    "model",
                    id,
                    format!(
                        "snapshot {} resolves outside {}",
                        p.display(),
                        snapshots.display()
                    ),
                ));
            }
            return Ok(p);
        }
    }
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_cached())?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir() && confined(&e.path()))
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p).ok_or_else(not_cached)
}

/// Resolves a model argument: `None` → `$LLADA_MODEL` or the shipped model; an existing path →
/// that folder; `owner/name` → its snapshot in the local hub cache.
pub fn resolve(spec: Option<&str>) -> Result<PathBuf> {
    let spec: String = match spec {
        Some(s) => s.to_string(),
        None => match std::env::var(MODEL_ENV) {
            Ok(s) if !s.is_empty() => s,
            _ => {
                let p = shipped_model();
                if p.join("config.json").exists() {
                    return Ok(p);
                }
                return Err(Error::setting(
                    "model",
                    "none given",
                    format!(
                        "pass a checkpoint folder or hub id, or set {MODEL_ENV} (the shipped model {} is absent)",
                        p.display()
                    ),
                ));
            }
        },
    };
    let path = PathBuf::from(&spec);
    if path.exists() {
        // a training run's folder (or its checkpoints/latest) stands for its last checkpoint
        if let Some(ck) = crate::train::trainer::run_checkpoint(&path) {
            tracing::info!(
                "{} is a training run: loading {}",
                path.display(),
                ck.display()
            );
            return Ok(ck);
        }
        return Ok(path);
    }
    if is_hub_id(&spec) {
        return hub_snapshot(&spec);
    }
    Err(Error::setting(
        "model",
        &spec,
        "no such folder, and not a hub id of the form owner/name",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("GSAI-ML/LLaDA-8B-Instruct"));
        assert!(!is_hub_id("./x"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("plain"));
    }

    /// A cache with one repository `o/n` whose refs/main holds `rev`, one snapshot `abc123` and,
    /// next to the cache, a folder `outside`.
    fn cache_with(rev: &str) -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("hub");
        let repo = cache.join("models--o--n");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::fs::write(repo.join("refs/main"), rev).unwrap();
        (t, cache)
    }

    #[test]
    fn refs_main_is_a_revision_confined_to_the_snapshots() {
        let (_t, cache) = cache_with("abc123\n");
        let p = snapshot_in(&cache, "o/n").unwrap();
        assert!(
            p.ends_with("models--o--n/snapshots/abc123"),
            "{}",
            p.display()
        );
        for bad in ["../../../outside", "/etc", "abc/../abc123", ".."] {
            let (_t, cache) = cache_with(bad);
            let e = snapshot_in(&cache, "o/n").unwrap_err().to_string();
            assert!(
                e.contains("refs/main") && e.contains("not a revision"),
                "{bad}: {e}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_snapshot_linking_outside_the_cache_is_refused() {
        let (t, cache) = cache_with("evil");
        let snaps = cache.join("models--o--n/snapshots");
        std::os::unix::fs::symlink(t.path().join("outside"), snaps.join("evil")).unwrap();
        let e = snapshot_in(&cache, "o/n").unwrap_err().to_string();
        assert!(e.contains("resolves outside"), "{e}");
        // nor is it picked as the newest snapshot when refs/main is absent
        std::fs::remove_file(cache.join("models--o--n/refs/main")).unwrap();
        let p = snapshot_in(&cache, "o/n").unwrap();
        assert!(p.ends_with("snapshots/abc123"), "{}", p.display());
    }
}
