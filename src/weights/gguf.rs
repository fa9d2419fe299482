//! A small GGUF (v2/v3) reader: header, metadata of every value type, tensor infos, alignment,
//! and dequantization of the common ggml types into f32.
//!
//! Layout (little-endian): magic `GGUF`, version `u32`, tensor count `u64`, metadata count
//! `u64`, the metadata key/value pairs, one info per tensor (name, dims in ggml order — fastest
//! first —, type, offset), padding to `general.alignment` (32 by default), then the tensor data.
//! The data of a ggml type comes in blocks: `Q4_1` stores 32 weights as an f16 scale `d`, an f16
//! minimum `m` and 16 bytes of 4-bit quants (`x = q·d + m`); the K-quants pack 256 weights in
//! super-blocks with 6-bit sub-block scales. Each decoder below follows ggml's reference
//! `dequantize_row_*` and is checked against the `gguf` Python package (tests/gguf.rs).
//!
//! Tensors are read on demand (seek + read), so opening a multi-GB file costs only its header.
use crate::error::LlmError;
use anyhow::Result;
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::Tensor;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Guards against absurd lengths in a corrupt header (a string or array this long is not real).
const MAX_LEN: u64 = 1 << 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// Any integer type as `i64` (`None` for other types or a `u64` beyond `i64`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any number as `f64`; an `f32` becomes the shortest decimal that round-trips it (the
    /// value the writer meant: `1e-5`, not `9.99999974e-6`).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
}

/// ggml tensor types (the ids of ggml.h). Only the ones this reader can decode, plus those it
/// recognises to name them in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// A known id of an i-quant or other exotic type this reader does not decode.
    Other(u32),
}

const QK_K: usize = 256;

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            16..=23 | 29 | 34 | 35 | 39 => Self::Other(id),
            _ => return None,
        })
    }

    /// (weights per block, bytes per block); `None` for types whose layout this reader ignores.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            Self::F32 | Self::I32 => (1, 4),
            Self::F16 | Self::BF16 | Self::I16 => (1, 2),
            Self::I8 => (1, 1),
            Self::I64 | Self::F64 => (1, 8),
            Self::Q4_0 => (32, 2 + 16),
            Self::Q4_1 => (32, 2 + 2 + 16),
            Self::Q5_0 => (32, 2 + 4 + 16),
            Self::Q5_1 => (32, 2 + 2 + 4 + 16),
            Self::Q8_0 => (32, 2 + 32),
            Self::Q8_1 => (32, 4 + 4 + 32),
            Self::Q2_K => (QK_K, QK_K / 16 + QK_K / 4 + 2 + 2),
            Self::Q3_K => (QK_K, QK_K / 8 + QK_K / 4 + 12 + 2),
            Self::Q4_K => (QK_K, 2 + 2 + 12 + QK_K / 2),
            Self::Q5_K => (QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2),
            Self::Q6_K => (QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
            Self::Q8_K => (QK_K, 4 + QK_K + QK_K / 16 * 2),
            Self::Other(_) => return None,
        })
    }

    /// Whether [`dequantize`] supports the type.
    pub fn decodable(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q5_0
                | Self::Q5_1
                | Self::Q8_0
                | Self::Q4_K
                | Self::Q5_K
                | Self::Q6_K
        )
    }

    pub fn name(self) -> String {
        match self {
            Self::Other(id) => format!("ggml type {id}"),
            t => format!("{t:?}"),
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order (fastest-varying first); PyTorch's shape is the reverse.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The PyTorch shape (dims reversed).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Bytes of data, when the type's layout is known.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = self.ggml_type.block_layout()?;
        Some(self.n_elements() / block as u64 * size as u64)
    }
}

/// An open GGUF file: its metadata and tensor infos; the data is read on demand.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_start: u64,
    file_len: u64,
}

/// Reader over the header that turns short reads into "truncated" errors naming what was read.
struct Header<R> {
    r: R,
    path: PathBuf,
}

impl<R: Read> Header<R> {
    fn err(&self, message: String) -> anyhow::Error {
        LlmError::BadFile {
            path: self.path.clone(),
            message,
        }
        .into()
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err(format!(
                    "truncated GGUF file: it ends inside the header (reading {what})"
                ))
            } else {
                self.err(format!("read error in the GGUF header ({what}): {e}"))
            }
        })?;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn len(&mut self, what: &str) -> Result<u64> {
        let n = self.u64(what)?;
        if n > MAX_LEN {
            return Err(self.err(format!(
                "corrupt GGUF header: {what} has length {n}, which is not plausible"
            )));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)? as usize;
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b).map_err(|_| {
            self.err(format!(
                "truncated GGUF file: it ends inside the header (reading {what})"
            ))
        })?;
        String::from_utf8(b).map_err(|_| self.err(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, key: &str) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(u8::from_le_bytes(self.bytes(key)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(key)?)),
            7 => {
                let [b] = self.bytes::<1>(key)?;
                if b > 1 {
                    return Err(
                        self.err(format!("metadata '{key}': bool byte {b}, expected 0 or 1"))
                    );
                }
                Value::Bool(b == 1)
            }
            8 => Value::String(self.string(key)?),
            9 => {
                let elem = self.u32(key)?;
                let n = self.len(key)?;
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(key)?)),
            other => {
                return Err(self.err(format!(
                    "metadata '{key}' has value type {other}; GGUF defines types 0 to 12"
                )))
            }
        })
    }
}

impl GgufFile {
    /// Reads the header of a GGUF v2/v3 file and checks that every tensor's data lies in it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| LlmError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| LlmError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut h = Header {
            r: BufReader::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
        };
        let magic: [u8; 4] = h.bytes("the magic number")?;
        if &magic != MAGIC {
            return Err(h.err(format!(
                "not a GGUF file: it starts with {magic:02x?}, a GGUF file starts with the magic 'GGUF'"
            )));
        }
        let version = h.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(h.err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            )));
        }
        let n_tensors = h.len("the tensor count")?;
        let n_kv = h.len("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = h.string(&format!("metadata key #{i}"))?;
            let t = h.u32(&key)?;
            let v = h.value(t, &key)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = h.string(&format!("the name of tensor #{i}"))?;
            let n_dims = h.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(h.err(format!(
                    "tensor '{name}' has {n_dims} dimensions; ggml tensors have 1 to 4"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| h.u64(&name))
                .collect::<Result<Vec<_>>>()?;
            let type_id = h.u32(&name)?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                h.err(format!(
                    "tensor '{name}' has an unknown ggml type id {type_id}"
                ))
            })?;
            let offset = h.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(h.err(format!(
                        "general.alignment = {v:?}: expected a power of two"
                    )))
                }
            },
        };
        let header_end =
            h.r.stream_position()
                .map_err(|e| h.err(format!("cannot seek: {e}")))?;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let gguf = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            file_len,
        };
        for t in &gguf.tensors {
            if let Some((block, _)) = t.ggml_type.block_layout() {
                if t.dims[0] % block as u64 != 0 {
                    return Err(gguf.err(format!(
                        "tensor '{}' ({}) has a first dimension of {}, not a multiple of its block size {block}",
                        t.name,
                        t.ggml_type.name(),
                        t.dims[0]
                    )));
                }
            }
            if let Some(n) = t.n_bytes() {
                let end = gguf.data_start + t.offset + n;
                if end > file_len {
                    return Err(gguf.err(format!(
                        "truncated GGUF file: tensor '{}' needs bytes up to {end}, the file has {file_len}",
                        t.name
                    )));
                }
            }
        }
        Ok(gguf)
    }

    fn err(&self, message: String) -> anyhow::Error {
        LlmError::BadFile {
            path: self.path.clone(),
            message,
        }
        .into()
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.err(format!("metadata key '{key}' is missing")))
    }

    /// A required integer metadata value.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.required(key)?;
        v.as_i64().ok_or_else(|| {
            self.err(format!(
                "metadata '{key}' is a {}, expected an integer",
                v.type_name()
            ))
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        v.as_f64().ok_or_else(|| {
            self.err(format!(
                "metadata '{key}' is a {}, expected a number",
                v.type_name()
            ))
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str().ok_or_else(|| {
            self.err(format!(
                "metadata '{key}' is a {}, expected a string",
                v.type_name()
            ))
        })
    }

    /// A required array of strings (token lists, merges).
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.required(key)?;
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(format!("metadata '{key}' is not an array")))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| self.err(format!("metadata '{key}' holds a non-string value")))
            })
            .collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor's data.
    pub fn raw(&self, info: &TensorInfo) -> Result<Vec<u8>> {
        let n = info.n_bytes().ok_or_else(|| {
            self.err(format!(
                "tensor '{}' has type {}, which this reader does not support",
                info.name,
                info.ggml_type.name()
            ))
        })?;
        let mut f = File::open(&self.path).map_err(|source| LlmError::Io {
            path: self.path.clone(),
            source,
        })?;
        f.seek(SeekFrom::Start(self.data_start + info.offset))
            .and_then(|_| {
                let mut buf = vec![0u8; n as usize];
                f.read_exact(&mut buf).map(|_| buf)
            })
            .map_err(|e| {
                self.err(format!(
                    "cannot read the data of tensor '{}': {e}",
                    info.name
                ))
            })
    }

    /// A tensor dequantized to f32, in PyTorch's shape (ggml dims reversed), on the CPU.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| self.err(format!("the file has no tensor '{name}'")))?;
        let raw = self.raw(info)?;
        let values = dequantize(info.ggml_type, &raw, info.n_elements() as usize)
            .map_err(|m| self.err(format!("tensor '{}': {m}", info.name)))?;
        Ok(Tensor::from_slice(&values).view(info.shape().as_slice()))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes `n` weights of type `t` from `raw` (ggml's `dequantize_row_*`).
pub fn dequantize(t: GgmlType, raw: &[u8], n: usize) -> Result<Vec<f32>, String> {
    if !t.decodable() {
        return Err(format!(
            "type {} can't be dequantized by llmlab (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
            t.name()
        ));
    }
    let (block, size) = t.block_layout().ok_or("unknown layout")?;
    if !n.is_multiple_of(block) || raw.len() != n / block * size {
        return Err(format!(
            "{} bytes for {n} weights of type {}: expected {}",
            raw.len(),
            t.name(),
            n / block * size
        ));
    }
    let mut out = Vec::with_capacity(n);
    match t {
        GgmlType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => {
            for b in raw.chunks_exact(size) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in raw.chunks_exact(size) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q5_0 => {
            for b in raw.chunks_exact(size) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                for (j, &q) in qs.iter().enumerate() {
                    let xh = ((qh >> j) << 4) & 0x10;
                    out.push((((q & 0x0F) as u32 | xh) as i32 - 16) as f32 * d);
                }
                for (j, &q) in qs.iter().enumerate() {
                    let xh = (qh >> (j + 12)) & 0x10;
                    out.push((((q >> 4) as u32 | xh) as i32 - 16) as f32 * d);
                }
            }
        }
        GgmlType::Q5_1 => {
            for b in raw.chunks_exact(size) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..24];
                for (j, &q) in qs.iter().enumerate() {
                    let xh = ((qh >> j) << 4) & 0x10;
                    out.push(((q & 0x0F) as u32 | xh) as f32 * d + m);
                }
                for (j, &q) in qs.iter().enumerate() {
                    let xh = (qh >> (j + 12)) & 0x10;
                    out.push(((q >> 4) as u32 | xh) as f32 * d + m);
                }
            }
        }
        GgmlType::Q8_0 => {
            for b in raw.chunks_exact(size) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        GgmlType::Q4_K => {
            for b in raw.chunks_exact(size) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..16 + QK_K / 2];
                for (i, q) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * i, scales);
                    let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&x| d1 * (x & 0x0F) as f32 - min1));
                    out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - min2));
                }
            }
        }
        GgmlType::Q5_K => {
            for b in raw.chunks_exact(size) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..16 + QK_K / 8];
                let qs = &b[16 + QK_K / 8..];
                for (i, ql) in qs.chunks_exact(32).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * i, scales);
                    let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * i), 2u8 << (2 * i));
                    for l in 0..32 {
                        let hi = if qh[l] & u1 != 0 { 16 } else { 0 };
                        out.push(d1 * ((ql[l] & 0x0F) + hi) as f32 - min1);
                    }
                    for l in 0..32 {
                        let hi = if qh[l] & u2 != 0 { 16 } else { 0 };
                        out.push(d2 * ((ql[l] >> 4) + hi) as f32 - min2);
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for b in raw.chunks_exact(size) {
                let ql_all = &b[..QK_K / 2];
                let qh_all = &b[QK_K / 2..QK_K / 2 + QK_K / 4];
                let sc_all = &b[QK_K / 2 + QK_K / 4..QK_K / 2 + QK_K / 4 + QK_K / 16];
                let d = f16_at(b, QK_K / 2 + QK_K / 4 + QK_K / 16);
                for half in 0..2 {
                    let ql = &ql_all[64 * half..];
                    let qh = &qh_all[32 * half..];
                    let sc = &sc_all[8 * half..];
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * (sc[k] as i8) as f32;
                        y[l] = s(is) * q1 as f32;
                        y[l + 32] = s(is + 2) * q2 as f32;
                        y[l + 64] = s(is + 4) * q3 as f32;
                        y[l + 96] = s(is + 6) * q4 as f32;
                    }
                    out.extend_from_slice(&y);
                }
            }
        }
        _ => unreachable!("decodable() checked above"),
    }
    Ok(out)
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K super-block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_unpacks_the_high_bits() {
        let mut q = [0u8; 12];
        q[0] = 0b1100_0001; // sc0 = 1; its top two bits are sc4's high bits (3)
        q[4] = 0b0100_0010; // m0 = 2; its top two bits are m4's high bits (1)
        q[8] = 0x35; // sc4 low nibble = 5, m4 low nibble = 3
        assert_eq!(scale_min_k4(0, &q), (1, 2));
        assert_eq!(scale_min_k4(4, &q), (5 | (3 << 4), 3 | (1 << 4)));
    }

    #[test]
    fn q8_0_block_decodes() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(&y[..3], &[2.0, -3.0, 0.0]);
        assert!(dequantize(GgmlType::Q8_0, &b[..33], 32).is_err());
        assert!(dequantize(GgmlType::Q2_K, &[0; 84], 256).is_err());
    }
}
