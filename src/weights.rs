//! Checkpoint files: finding single or sharded safetensors, memory-mapping them, reading tensors
//! with checked names, shapes and dtypes, and writing checkpoints atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{check_regular_file, not_regular, read_json, Error, Result};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the memory map.
    range: std::ops::Range<usize>,
}

/// The safetensors files of a checkpoint folder, memory-mapped and validated.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

fn dtype_of(path: &Path, name: &str, dtype: safetensors::Dtype) -> Result<DType> {
    match dtype {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F16 => Ok(DType::F16),
        other => Err(Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("tensor {name} is stored as {other:?}; supported: F32, BF16, F16"),
        }),
    }
}

impl SafetensorsFiles {
    /// Opens `dir/model.safetensors`, or `dir/model.safetensors.index.json` and every shard it
    /// names. Each file's header is checked against its size (a truncated file is an error here,
    /// not later).
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let mut out = SafetensorsFiles {
            files: Vec::new(),
            entries: HashMap::new(),
        };
        if index_path.exists() {
            check_regular_file(&index_path)?;
            let index: Index = read_json(&index_path)?;
            let mut shards: Vec<&String> = index.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            let mut file_of = HashMap::new();
            for shard in shards {
                let path = shard_path(dir, shard)?;
                file_of.insert(shard.clone(), out.add_file(path)?);
            }
            // Every tensor the index lists must be in the shard it names.
            for (name, shard) in &index.weight_map {
                let file = file_of[shard];
                match out.entries.get(name) {
                    Some(e) if e.file == file => {}
                    _ => {
                        return Err(Error::Checkpoint {
                            path: out.files[file].0.clone(),
                            reason: format!("{INDEX_FILE} places tensor {name} in this shard, but the shard does not hold it"),
                        })
                    }
                }
            }
        } else if std::fs::symlink_metadata(&single).is_ok() {
            out.add_file(single_file_path(dir)?)?;
        } else {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!("no {SINGLE_FILE} and no {INDEX_FILE} in this folder"),
            });
        }
        Ok(out)
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut out = SafetensorsFiles {
            files: Vec::new(),
            entries: HashMap::new(),
        };
        if !path.exists() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: "file not found".into(),
            });
        }
        out.add_file(path.to_path_buf())?;
        Ok(out)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<usize> {
        // Checked before opening: opening a FIFO blocks, and a device is no weight file.
        check_regular_file(&path)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // and on what was opened (the path may have been replaced in between)
        match file.metadata() {
            Ok(m) if m.is_file() => {}
            Ok(m) => return Err(not_regular(&path, &m)),
            Err(e) => return Err(Error::io(&path, e)),
        }
        // SAFETY: the map is read-only; a checkpoint modified while mapped is a user error that can
        // at worst change the values read, which the safetensors header check below bounds.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let idx = self.files.len();
        {
            let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Checkpoint {
                path: path.clone(),
                reason: match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer => format!(
                        "truncated or corrupt: the header describes a data section that does not match the file size ({} bytes)",
                        mmap.len()
                    ),
                    other => format!("not a valid safetensors file: {other}"),
                },
            })?;
            let base = mmap.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = dtype_of(&path, &name, view.dtype())?;
                let start = view.data().as_ptr() as usize - base;
                let range = start..start + view.data().len();
                if self.entries.contains_key(&name) {
                    return Err(Error::Checkpoint {
                        path: path.clone(),
                        reason: format!("tensor {name} appears in more than one file"),
                    });
                }
                self.entries.insert(
                    name,
                    Entry {
                        file: idx,
                        dtype,
                        shape: view.shape().to_vec(),
                        range,
                    },
                );
            }
        }
        self.files.push((path, mmap));
        Ok(idx)
    }

    /// Names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// Stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Stored dtype of a tensor.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// The files behind the checkpoint.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.range.len() as u64).sum()
    }

    /// Reads tensor `name`, checks its shape, converts it to `dtype` and places it on `device`.
    /// Only this tensor is copied out of the memory map (a GPU load never holds a second full copy
    /// of the checkpoint in host memory).
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.describe(),
        })?;
        let (path, mmap) = &self.files[entry.file];
        if entry.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                path: path.clone(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let bytes = &mmap[entry.range.clone()];
        let bad = non_finite_count(bytes, entry.dtype);
        if bad > 0 {
            tracing::warn!(
                "tensor {name} in {}: {bad} of {} values are not finite (NaN or ±inf); outputs computed from it will be NaN",
                path.display(),
                bytes.len() / entry.dtype.size_in_bytes().max(1)
            );
        }
        let t = Tensor::from_raw_buffer(bytes, entry.dtype, shape, &Device::Cpu)?;
        let t = if device.is_cpu() {
            t.to_dtype(dtype)?
        } else {
            t.to_device(device)?.to_dtype(dtype)?
        };
        // The file's pages were read once: drop them from this process's resident set so a
        // loader holds at most one tensor beyond the model (they stay in the page cache).
        #[cfg(unix)]
        {
            let page = 4096;
            let start = entry.range.start / page * page;
            let len = entry.range.end.saturating_sub(start) / page * page;
            if len > 0 {
                // SAFETY: read-only file mapping; dropping its pages only makes later reads fault
                // them back in from the file.
                let _ = unsafe {
                    mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
        }
        Ok(t)
    }

    fn describe(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            [(p, _), ..] => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            [] => PathBuf::new(),
        }
    }
}

const CONFINED: &str = "shards must be files inside the checkpoint folder";

/// The `blobs` folder of the Hugging Face hub repository whose snapshot `root` (a canonical path)
/// is: `root` is `…/models--o--n/snapshots/REV`; `None` for any other folder.
fn hub_blobs(root: &Path) -> Option<PathBuf> {
    let repo = root
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .filter(|r| {
            r.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("models--"))
        })?;
    std::fs::canonicalize(repo.join("blobs")).ok()
}

/// The real path (symlinks resolved) of the shard named by `model.safetensors.index.json`,
/// confined to the checkpoint folder: the name must be a relative path of plain components (`.`
/// allowed; no `..`, root or drive), the file must exist, and its real path must lie inside the
/// folder's real path — or, for a Hugging Face hub snapshot (`models--o--n/snapshots/REV`), in
/// that repository's `blobs` folder (its real path), where the hub keeps the files its snapshots
/// link to. The path returned is the one checked.
pub fn shard_path(dir: &Path, shard: &str) -> Result<PathBuf> {
    let refuse = |path: PathBuf, why: &str| Error::Checkpoint {
        path,
        reason: format!("shard {shard:?} named in {INDEX_FILE} {why}: {CONFINED}"),
    };
    let rel = Path::new(shard);
    let plain = rel.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) && rel
        .components()
        .any(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(refuse(
            dir.join(INDEX_FILE),
            "is not a relative path below the folder",
        ));
    }
    let path = dir.join(rel);
    if std::fs::symlink_metadata(&path).is_err() {
        return Err(Error::Checkpoint {
            path,
            reason: format!("shard named in {INDEX_FILE} is absent"),
        });
    }
    let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
    let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    let inside = real.starts_with(&root) || hub_blobs(&root).is_some_and(|b| real.starts_with(b));
    if !inside {
        return Err(refuse(
            path,
            &format!("resolves to {}, outside the folder", real.display()),
        ));
    }
    Ok(real)
}

/// The `model.safetensors` of a checkpoint folder to open. In a hub snapshot it is confined as
/// shards are (to the snapshot or the repository's `blobs`): a tampered cache cannot point it at
/// another file. In a local folder the user made, a symlinked `model.safetensors` may point
/// anywhere (e.g. another disk); either way it must be a regular file ([`check_regular_file`]).
fn single_file_path(dir: &Path) -> Result<PathBuf> {
    let single = dir.join(SINGLE_FILE);
    let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    let Some(blobs) = hub_blobs(&root) else {
        return Ok(single);
    };
    let real = std::fs::canonicalize(&single).map_err(|e| Error::io(&single, e))?;
    if real.starts_with(&root) || real.starts_with(&blobs) {
        Ok(real)
    } else {
        Err(Error::Checkpoint {
            path: single,
            reason: format!(
                "resolves to {}, outside this hub snapshot and its repository's blobs {}",
                real.display(),
                blobs.display()
            ),
        })
    }
}

/// How many stored values of a tensor are NaN or ±inf (exponent bits all ones), read from its
/// little-endian bytes in one parallel pass.
pub fn non_finite_count(bytes: &[u8], dtype: DType) -> usize {
    use rayon::prelude::*;
    let count = |chunk: &[u8]| -> usize {
        match dtype {
            DType::F32 => chunk
                .chunks_exact(4)
                .filter(|b| {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
                })
                .count(),
            DType::BF16 => chunk
                .chunks_exact(2)
                .filter(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80)
                .count(),
            DType::F16 => chunk
                .chunks_exact(2)
                .filter(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00)
                .count(),
            _ => 0,
        }
    };
    // chunks of a multiple of every element size
    bytes.par_chunks(1 << 20).map(count).sum()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then renamed
/// over the target. A crash mid-write leaves the old file (if any) intact.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| f.write_all(bytes))
}

/// Like [`atomic_write`], with a writer callback.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        {
            let mut w = std::io::BufWriter::new(&file);
            write(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Serialises named tensors into safetensors bytes (metadata `{"format": "pt"}`, as HF writes).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut info = HashMap::new();
    info.insert("format".to_string(), "pt".to_string());
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), Some(info)).map_err(
        |e| Error::Checkpoint {
            path: PathBuf::new(),
            reason: format!("serialising tensors: {e}"),
        },
    )
}

/// Writes tensors in Hugging Face form into `dir`: `model.safetensors`, or, when the data exceeds
/// `max_shard_bytes`, `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
/// Every file is written atomically.
pub fn save_safetensors(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: u64,
) -> Result<()> {
    let specs: Vec<(String, Vec<usize>, candle_core::DType)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec(), t.dtype()))
        .collect();
    let mut i = 0;
    save_safetensors_with(dir, &specs, max_shard_bytes, &mut |_, _| {
        let t = tensors[i].1.clone();
        i += 1;
        Ok(t)
    })
}

/// Like [`save_safetensors`], producing each tensor (in `specs` order) only when its shard is
/// written, so at most one shard is held in memory (e.g. `llada init` of an 8B-shaped model).
pub fn save_safetensors_with(
    dir: &Path,
    specs: &[(String, Vec<usize>, candle_core::DType)],
    max_shard_bytes: u64,
    produce: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
) -> Result<()> {
    // every tensor's bytes, checked: a shape from an absurd config must not wrap to a small size
    let mut sizes = Vec::with_capacity(specs.len());
    for (name, shape, dt) in specs {
        let bytes = shape
            .iter()
            .try_fold(dt.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .and_then(|b| u64::try_from(b).ok());
        sizes.push(bytes.ok_or_else(|| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "tensor {name} of shape {shape:?} ({dt:?}) has more bytes than this machine can address"
            ),
        })?);
    }
    let total = sizes
        .iter()
        .try_fold(0u64, |acc, &b| acc.checked_add(b))
        .ok_or_else(|| Error::Checkpoint {
            path: dir.to_path_buf(),
            reason: "the tensors together have more than 2^64 bytes".into(),
        })?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // the sharding plan, from the sizes alone
    let mut plan: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if current > 0 && current + size > max_shard_bytes {
            plan.push(Vec::new());
            current = 0;
        }
        current += size;
        if let Some(last) = plan.last_mut() {
            last.push(i);
        }
    }
    let count = plan.len();
    let mut weight_map = BTreeMap::new();
    for (k, shard) in plan.iter().enumerate() {
        let tensors = shard
            .iter()
            .map(|&i| Ok((specs[i].0.clone(), produce(&specs[i].0, &specs[i].1)?)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors_bytes(&tensors)?;
        drop(tensors);
        if count == 1 {
            atomic_write(&dir.join(SINGLE_FILE), &bytes)?;
            remove_stale_shards(dir);
            return Ok(());
        }
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, count);
        atomic_write(&dir.join(&file), &bytes)?;
        for &i in shard {
            weight_map.insert(specs[i].0.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Checkpoint {
        path: dir.join(INDEX_FILE),
        reason: e.to_string(),
    })?;
    atomic_write(&dir.join(INDEX_FILE), text.as_bytes())?;
    let _ = std::fs::remove_file(dir.join(SINGLE_FILE));
    Ok(())
}

/// Whether `name` (a bare file name) is one this writer produces for weights: `model.safetensors`,
/// `model.safetensors.index.json` or a shard.
pub fn is_weight_file_name(name: &str) -> bool {
    name == SINGLE_FILE || name == INDEX_FILE || is_shard_name(name)
}

/// Whether `name` is a shard file name as this writer makes them: `model-NNNNN-of-NNNNN.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    mid.split_once("-of-").is_some_and(|(a, b)| {
        [a, b]
            .iter()
            .all(|p| p.len() == 5 && p.bytes().all(|c| c.is_ascii_digit()))
    })
}

/// Removes the index and shards of an earlier sharded save in `dir`, once a single file replaced
/// them. Only this folder's own shard files (`model-NNNNN-of-NNNNN.safetensors`, plain files) are
/// removed, whatever the index names: an index pointing elsewhere (`../x`, `/abs`) deletes nothing
/// outside the folder.
fn remove_stale_shards(dir: &Path) {
    let index = dir.join(INDEX_FILE);
    if let Ok(idx) = read_json::<Index>(&index) {
        let _ = std::fs::remove_file(&index);
        for shard in idx.weight_map.values() {
            let path = dir.join(shard);
            if is_shard_name(shard) && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_sizes_are_checked_before_anything_is_produced() {
        // 2^40 × 2^40 × 4 bytes wrapped to 0: the plan was made and the tensor produced
        let d = tempfile::tempdir().unwrap();
        let specs = vec![("w".to_string(), vec![1usize << 40, 1 << 40], DType::F32)];
        let e = save_safetensors_with(d.path(), &specs, u64::MAX, &mut |_, _| {
            panic!("produced a tensor of a size that does not fit")
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tensor w of shape [1099511627776, 1099511627776]")
                && e.contains("more bytes than this machine can address"),
            "{e}"
        );
        let specs = vec![
            ("a".to_string(), vec![1usize << 61], DType::F32),
            ("b".to_string(), vec![1usize << 61], DType::F32),
        ];
        let e = save_safetensors_with(d.path(), &specs, u64::MAX, &mut |_, _| unreachable!())
            .unwrap_err()
            .to_string();
        assert!(e.contains("together have more than 2^64 bytes"), "{e}");
    }
}
