//! GGUF files: metadata and tensors, dequantized to f32 (candle's GGUF reader does the decoding
//! of every ggml quant type it supports; this module adds clear errors and typed metadata access).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

/// Quant types candle (and so Loupe) can dequantize.
pub const SUPPORTED_QUANTS: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

/// Refuse a file that is empty or does not start with the GGUF magic, naming it.
pub fn check_magic(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open model file {}", path.display()))?;
    let mut magic = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut magic)
        .with_context(|| format!("cannot read model file {}", path.display()))?;
    if magic.is_empty() {
        bail!("model file {} is empty (0 bytes), not a GGUF file", path.display());
    }
    if magic != b"GGUF" {
        bail!("{} is not a GGUF file (it does not start with \"GGUF\")", path.display());
    }
    Ok(())
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        check_magic(path)?;
        let file = File::open(path).with_context(|| format!("cannot open model file {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let e = e.to_string();
            if e.contains("unknown dtype") || e.contains("dtype") {
                anyhow!(
                    "{} uses a quant type Loupe cannot read ({e}); supported: {SUPPORTED_QUANTS}",
                    path.display()
                )
            } else {
                anyhow!("{} is not a readable GGUF file: {e}", path.display())
            }
        })?;
        Ok(Gguf { path: path.to_path_buf(), content, reader })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`, e.g. `gemma3`.
    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")
    }

    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| anyhow!("{}: GGUF metadata has no {key}", self.path.display()))
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.value(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| anyhow!("{key}: {e}"))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.value(key)?;
        v.to_f32().or_else(|_| v.to_f64().map(|x| x as f32)).map_err(|e| anyhow!("{key}: {e}"))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        Ok(self.value(key)?.to_string().map_err(|e| anyhow!("{key}: {e}"))?.clone())
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        let values = self.value(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        values.iter().map(|v| v.to_string().cloned().map_err(|e| anyhow!("{key}: {e}"))).collect()
    }

    /// An array of numbers as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        let values = self.value(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        values.iter().map(|v| v.to_f32().map_err(|e| anyhow!("{key}: {e}"))).collect()
    }

    /// An array of integers as i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        let values = self.value(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        values
            .iter()
            .map(|v| v.to_i32().or_else(|_| v.to_u32().map(|x| x as i32)).map_err(|e| anyhow!("{key}: {e}")))
            .collect()
    }

    pub fn tensor_names(&self) -> Vec<&str> {
        self.content.tensor_infos.keys().map(String::as_str).collect()
    }

    /// Read and dequantize a tensor to f32 (shape in PyTorch order, e.g. `[out, in]`).
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            bail!("{}: GGUF has no tensor {name}", self.path.display());
        };
        // candle sizes the tensor with unchecked products, and views an empty one through a
        // misaligned pointer: refuse both shapes first (it checks the size against the file).
        let dims = info.shape.dims();
        let dtype = info.ggml_dtype;
        let bytes = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|elems| (elems / dtype.block_size()).checked_mul(dtype.type_size()));
        if bytes.is_none_or(|b| b == 0) {
            bail!("{}: tensor {name} has an impossible shape {dims:?} (corrupt file?)", self.path.display());
        }
        let q = self.content.tensor(&mut self.reader, name, device).map_err(|e| {
            anyhow!("{}: cannot read tensor {name}: {e} (truncated or corrupt file?)", self.path.display())
        })?;
        let t = q.dequantize(device).map_err(|e| {
            anyhow!(
                "{}: cannot dequantize {name} ({:?}): {e}; supported: {SUPPORTED_QUANTS}",
                self.path.display(),
                q.dtype()
            )
        })?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

    use super::*;

    /// A GGUF with one `[4, 32]` F32 tensor whose dimensions are then patched to `dims`.
    fn with_dims(dims: [u64; 2]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let t = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("gemma3".into());
        let mut f = File::create(&path).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("w", &q)]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // The tensor info: name length, "w", n_dims (2), then the dims (innermost first).
        let at = bytes.windows(13).position(|w| w == b"\x01\0\0\0\0\0\0\0w\x02\0\0\0").unwrap() + 13;
        bytes[at..at + 8].copy_from_slice(&dims[1].to_le_bytes());
        bytes[at + 8..at + 16].copy_from_slice(&dims[0].to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn a_shape_whose_size_overflows_is_an_error() {
        // Found by the gguf fuzz target: candle multiplied these dimensions unchecked.
        let (_dir, path) = with_dims([1 << 32, 1 << 32]);
        let mut file = Gguf::open(&path).unwrap();
        let err = file.tensor("w", &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("tensor w has an impossible shape"), "{err}");
        // Found next: an empty tensor, which candle viewed through a misaligned pointer.
        let (_dir, path) = with_dims([0, 32]);
        let err = Gguf::open(&path).unwrap().tensor("w", &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("tensor w has an impossible shape [0, 32]"), "{err}");
        let (_dir, path) = with_dims([4, 32]);
        assert_eq!(Gguf::open(&path).unwrap().tensor("w", &Device::Cpu).unwrap().dims(), [4, 32]);
    }
}
