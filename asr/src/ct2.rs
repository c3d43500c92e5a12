//! Import from CTranslate2: read a faster-whisper model directory
//! (`model.bin`, `config.json`, `tokenizer.json`) and write the published
//! Hugging Face layout the loader reads (`config.json`,
//! `generation_config.json`, `model.safetensors`, `tokenizer.json`).
//!
//! `model.bin` (binary version 6, `WhisperSpec`) is little endian: `u32`
//! version, a `u16`-length name, `u32` revision, `u32` variable count, then
//! per variable a `u16`-length name, `u8` rank, `u32` dims, `u8` dtype,
//! `u32` byte count and the bytes; then `u32` alias count and alias pairs.
//! Names are NUL-terminated. The mapping inverts CTranslate2's
//! `WhisperLoader`: self-attention q/k/v are fused in `linear_0` (the key's
//! bias stored as zeros), cross-attention has `linear_0` = q and `linear_1` =
//! fused k/v, and the output projection is tied to the token embedding.
//! Weights keep their precision (float16 stays float16); int8 weights are
//! dequantized with their per-row `weight_scale`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::whisper::AsrError;

/// Largest `model.bin` accepted (large-v3 in float32 is about 6 GB).
const MAX_MODEL_BYTES: u64 = 8 << 30;
/// More variables than any Whisper spec has.
const MAX_VARIABLES: usize = 100_000;

/// A CTranslate2 variable's element type (`DataType` in CTranslate2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Type {
    F32,
    I8,
    I16,
    I32,
    F16,
    Bf16,
}

impl Ct2Type {
    fn from_code(code: u8) -> Option<Ct2Type> {
        Some(match code {
            0 => Ct2Type::F32,
            1 => Ct2Type::I8,
            2 => Ct2Type::I16,
            3 => Ct2Type::I32,
            4 => Ct2Type::F16,
            5 => Ct2Type::Bf16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Ct2Type::I8 => 1,
            Ct2Type::I16 | Ct2Type::F16 | Ct2Type::Bf16 => 2,
            Ct2Type::F32 | Ct2Type::I32 => 4,
        }
    }
}

/// One variable of a `model.bin`.
#[derive(Debug, Clone)]
pub struct Variable {
    pub dims: Vec<usize>,
    pub dtype: Ct2Type,
    pub bytes: Vec<u8>,
}

impl Variable {
    /// The value of a scalar integer variable (head counts, flags).
    fn scalar(&self) -> Option<i64> {
        let b = &self.bytes;
        match self.dtype {
            Ct2Type::I8 => b.first().map(|&x| i64::from(x as i8)),
            Ct2Type::I16 => Some(i64::from(i16::from_le_bytes(b.get(..2)?.try_into().ok()?))),
            Ct2Type::I32 => Some(i64::from(i32::from_le_bytes(b.get(..4)?.try_into().ok()?))),
            _ => None,
        }
    }
}

/// A parsed `model.bin`.
#[derive(Debug)]
pub struct Ct2Model {
    pub spec: String,
    pub revision: u32,
    pub variables: BTreeMap<String, Variable>,
    /// `alias -> target`, e.g. the tied output projection.
    pub aliases: BTreeMap<String, String>,
}

fn bad(path: &Path, reason: impl Into<String>) -> AsrError {
    AsrError::Weights {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn name(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        let raw = self.take(len)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        String::from_utf8(raw.to_vec()).ok()
    }
}

impl Ct2Model {
    /// Parses `model.bin` bytes; `path` only names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Ct2Model, AsrError> {
        let truncated = |what: &str| bad(path, format!("truncated or malformed at {what}"));
        let mut c = Cursor { buf: bytes, pos: 0 };
        let version = c.u32().ok_or_else(|| truncated("the version"))?;
        if !(5..=6).contains(&version) {
            return Err(bad(
                path,
                format!("CTranslate2 binary version {version} is not supported (5 or 6 are)"),
            ));
        }
        let spec = c.name().ok_or_else(|| truncated("the spec name"))?;
        let revision = c.u32().ok_or_else(|| truncated("the revision"))?;
        let count = c.u32().ok_or_else(|| truncated("the variable count"))? as usize;
        if count > MAX_VARIABLES {
            return Err(bad(path, format!("{count} variables is implausible")));
        }
        let mut variables = BTreeMap::new();
        for _ in 0..count {
            let name = c.name().ok_or_else(|| truncated("a variable name"))?;
            let rank = c.u8().ok_or_else(|| truncated(&name))? as usize;
            let dims = (0..rank)
                .map(|_| c.u32().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| truncated(&name))?;
            let code = c.u8().ok_or_else(|| truncated(&name))?;
            let dtype = Ct2Type::from_code(code)
                .ok_or_else(|| bad(path, format!("{name}: unknown data type {code}")))?;
            let len = c.u32().ok_or_else(|| truncated(&name))? as usize;
            let elems = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad(path, format!("{name}: shape overflows")))?;
            if elems.checked_mul(dtype.size()) != Some(len) {
                return Err(bad(
                    path,
                    format!("{name}: {len} bytes do not hold {dims:?} of {dtype:?}"),
                ));
            }
            let data = c.take(len).ok_or_else(|| truncated(&name))?;
            variables.insert(
                name,
                Variable {
                    dims,
                    dtype,
                    bytes: data.to_vec(),
                },
            );
        }
        // Aliases follow the variables from binary version 3 on.
        let mut aliases = BTreeMap::new();
        {
            let n = c.u32().ok_or_else(|| truncated("the alias count"))? as usize;
            if n > MAX_VARIABLES {
                return Err(bad(path, format!("{n} aliases is implausible")));
            }
            for _ in 0..n {
                let alias = c.name().ok_or_else(|| truncated("an alias"))?;
                let target = c.name().ok_or_else(|| truncated("an alias target"))?;
                aliases.insert(alias, target);
            }
        }
        Ok(Ct2Model {
            spec,
            revision,
            variables,
            aliases,
        })
    }

    fn get(&self, name: &str, path: &Path) -> Result<&Variable, AsrError> {
        let resolved = self.aliases.get(name).map_or(name, String::as_str);
        self.variables
            .get(resolved)
            .ok_or_else(|| bad(path, format!("variable {name} is missing")))
    }

    fn count_layers(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                let p = format!("{prefix}/layer_{i}/");
                self.variables.keys().any(|k| k.starts_with(&p))
            })
            .count()
    }

    /// A weight as a tensor in its stored precision; int8 is dequantized to
    /// float32 with the per-row `<name>_scale`.
    fn tensor(&self, name: &str, path: &Path) -> Result<Tensor, AsrError> {
        let v = self.get(name, path)?;
        let dev = Device::Cpu;
        let t = match v.dtype {
            Ct2Type::F32 => Tensor::from_raw_buffer(&v.bytes, DType::F32, &v.dims, &dev),
            Ct2Type::F16 => Tensor::from_raw_buffer(&v.bytes, DType::F16, &v.dims, &dev),
            Ct2Type::Bf16 => Tensor::from_raw_buffer(&v.bytes, DType::BF16, &v.dims, &dev),
            Ct2Type::I8 => {
                let scale_name = format!("{name}_scale");
                let scale = self.get(&scale_name, path)?;
                let scales = self.tensor(&scale_name, path)?.to_dtype(DType::F32)?;
                let rows = *v.dims.first().unwrap_or(&0);
                if scale.dims.iter().product::<usize>() != rows || rows == 0 {
                    return Err(bad(path, format!("{scale_name} does not match {name}")));
                }
                let q: Vec<f32> = v.bytes.iter().map(|&b| f32::from(b as i8)).collect();
                let q = Tensor::from_vec(q, v.dims.as_slice(), &dev)?;
                // One scale per output row, whatever the weight's rank
                // (matrices, and convolution kernels in newer versions).
                let mut scale_shape = vec![1usize; v.dims.len()];
                scale_shape[0] = rows;
                q.broadcast_div(&scales.reshape(scale_shape)?)
            }
            other => {
                return Err(bad(
                    path,
                    format!("{name}: {other:?} weights are not supported"),
                ));
            }
        };
        Ok(t?)
    }
}

/// What the converter derived from the tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedShape {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_heads: usize,
    pub vocab_size: usize,
    pub num_mel_bins: usize,
    pub multilingual: bool,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> AsrError + '_ {
    move |e| AsrError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Converts the CTranslate2 Whisper model in `src` into the published
/// layout in `out` (created if missing).
pub fn convert(src: &Path, out: &Path) -> Result<ConvertedShape, AsrError> {
    let bin = src.join("model.bin");
    let meta = std::fs::metadata(&bin).map_err(io_err(&bin))?;
    if meta.len() > MAX_MODEL_BYTES {
        return Err(bad(&bin, format!("{} bytes is too large", meta.len())));
    }
    let bytes = std::fs::read(&bin).map_err(io_err(&bin))?;
    let model = Ct2Model::parse(&bytes, &bin)?;
    drop(bytes);
    if model.spec != "WhisperSpec" {
        return Err(bad(
            &bin,
            format!("spec {} is not a Whisper model", model.spec),
        ));
    }
    let ct2_config_path = src.join("config.json");
    let ct2_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ct2_config_path).map_err(io_err(&ct2_config_path))?)
            .map_err(|e| AsrError::Config {
                path: ct2_config_path.clone(),
                reason: e.to_string(),
            })?;
    let tokenizer_src = src.join("tokenizer.json");
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tokenizer_src).map_err(|e| AsrError::Tokenizer {
            path: tokenizer_src.clone(),
            reason: e.to_string(),
        })?;

    let (tensors, shape) = map_tensors(&model, &bin)?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let id = |t: &str| tokenizer.token_to_id(t);
    // `None` when the key is absent: the written configs then leave it out,
    // and the loader falls back to Whisper's defaults rather than to "none".
    let ids = |key: &str| -> Option<Vec<u64>> {
        ct2_config
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
    };
    let eot = id("<|endoftext|>");
    let sot = id("<|startoftranscript|>");
    let config = serde_json::json!({
        "_name_or_path": format!("converted from CTranslate2 ({})", src.display()),
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "d_model": shape.d_model,
        "encoder_attention_heads": shape.encoder_heads,
        "decoder_attention_heads": shape.decoder_heads,
        "encoder_layers": shape.encoder_layers,
        "decoder_layers": shape.decoder_layers,
        "encoder_ffn_dim": tensors["model.encoder.layers.0.fc1.weight"].dim(0)?,
        "decoder_ffn_dim": tensors["model.decoder.layers.0.fc1.weight"].dim(0)?,
        "num_hidden_layers": shape.encoder_layers,
        "num_mel_bins": shape.num_mel_bins,
        "max_source_positions": tensors["model.encoder.embed_positions.weight"].dim(0)?,
        "max_target_positions": tensors["model.decoder.embed_positions.weight"].dim(0)?,
        "vocab_size": shape.vocab_size,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "begin_suppress_tokens": ids("suppress_ids_begin"),
        "suppress_tokens": ids("suppress_ids"),
        "scale_embedding": false,
        "torch_dtype": "float16",
        "use_cache": true,
    });
    let lang_to_id: serde_json::Map<String, serde_json::Value> = ids("lang_ids")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| {
            let t = tokenizer.id_to_token(u32::try_from(i).ok()?)?;
            Some((t, serde_json::Value::from(i)))
        })
        .collect();
    let generation = serde_json::json!({
        "alignment_heads": ct2_config.get("alignment_heads").cloned().unwrap_or_default(),
        "begin_suppress_tokens": ids("suppress_ids_begin"),
        "suppress_tokens": ids("suppress_ids"),
        "decoder_start_token_id": sot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "is_multilingual": shape.multilingual,
        "lang_to_id": lang_to_id,
        "task_to_id": { "transcribe": id("<|transcribe|>"), "translate": id("<|translate|>") },
        "no_timestamps_token_id": id("<|notimestamps|>"),
        "max_length": 448,
    });
    write_json(&out.join("config.json"), &without_nulls(config))?;
    write_json(
        &out.join("generation_config.json"),
        &without_nulls(generation),
    )?;
    let tokenizer_out = out.join("tokenizer.json");
    std::fs::copy(&tokenizer_src, &tokenizer_out).map_err(io_err(&tokenizer_out))?;
    let weights = out.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| bad(&weights, e.to_string()))?;
    Ok(shape)
}

/// Drops the top-level keys whose value is null (absent in the source).
fn without_nulls(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(map) = value.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    value
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), AsrError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| AsrError::Config {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(io_err(path))
}

/// CTranslate2 variables to Hugging Face tensors, and the shape read off them.
fn map_tensors(
    m: &Ct2Model,
    path: &Path,
) -> Result<(HashMap<String, Tensor>, ConvertedShape), AsrError> {
    let mut out = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        out.insert(name, t);
    };
    let conv1 = m.get("encoder/conv1/weight", path)?;
    let [d_model, num_mel_bins, 3] = conv1.dims[..] else {
        return Err(bad(
            path,
            format!("encoder/conv1/weight has shape {:?}", conv1.dims),
        ));
    };
    let heads = |name: &str| -> Result<usize, AsrError> {
        m.get(name, path)?
            .scalar()
            .and_then(|h| usize::try_from(h).ok())
            .filter(|&h| h > 0 && d_model % h == 0)
            .ok_or_else(|| {
                bad(
                    path,
                    format!("{name} is not a head count dividing {d_model}"),
                )
            })
    };
    let encoder_heads = heads("encoder/num_heads")?;
    let decoder_heads = heads("decoder/num_heads")?;
    if let Some(pre) = m
        .variables
        .get("decoder/pre_norm")
        .and_then(Variable::scalar)
        && pre != 1
    {
        return Err(bad(path, "post-norm transformers are not Whisper"));
    }
    let encoder_layers = m.count_layers("encoder");
    let decoder_layers = m.count_layers("decoder");
    if encoder_layers == 0 || decoder_layers == 0 {
        return Err(bad(path, "no encoder or decoder layers"));
    }

    let t = |name: &str| m.tensor(name, path);
    let split = |name: &str, parts: usize| -> Result<Vec<Tensor>, AsrError> {
        let x = t(name)?;
        let n = x.dim(0)?;
        if n != parts * d_model {
            return Err(bad(
                path,
                format!("{name} has {n} rows, not {parts} x {d_model}"),
            ));
        }
        Ok((0..parts)
            .map(|i| x.narrow(0, i * d_model, d_model))
            .collect::<Result<Vec<_>, _>>()?)
    };

    put(
        "model.encoder.conv1.weight".into(),
        t("encoder/conv1/weight")?,
    );
    put("model.encoder.conv1.bias".into(), t("encoder/conv1/bias")?);
    put(
        "model.encoder.conv2.weight".into(),
        t("encoder/conv2/weight")?,
    );
    put("model.encoder.conv2.bias".into(), t("encoder/conv2/bias")?);
    put(
        "model.encoder.embed_positions.weight".into(),
        t("encoder/position_encodings/encodings")?,
    );
    put(
        "model.encoder.layer_norm.weight".into(),
        t("encoder/layer_norm/gamma")?,
    );
    put(
        "model.encoder.layer_norm.bias".into(),
        t("encoder/layer_norm/beta")?,
    );
    let embed = t("decoder/embeddings/weight")?;
    let vocab_size = embed.dim(0)?;
    put("model.decoder.embed_tokens.weight".into(), embed);
    put(
        "model.decoder.embed_positions.weight".into(),
        t("decoder/position_encodings/encodings")?,
    );
    put(
        "model.decoder.layer_norm.weight".into(),
        t("decoder/layer_norm/gamma")?,
    );
    put(
        "model.decoder.layer_norm.bias".into(),
        t("decoder/layer_norm/beta")?,
    );

    // Shared by both stacks: the fused self-attention, its norm, the MLP.
    let mut block = |ct: &str, hf: &str| -> Result<(), AsrError> {
        let qkv_w = split(&format!("{ct}/self_attention/linear_0/weight"), 3)?;
        let qkv_b = split(&format!("{ct}/self_attention/linear_0/bias"), 3)?;
        let pairs = [
            ("self_attn.q_proj.weight", &qkv_w[0]),
            ("self_attn.k_proj.weight", &qkv_w[1]),
            ("self_attn.v_proj.weight", &qkv_w[2]),
            ("self_attn.q_proj.bias", &qkv_b[0]),
            ("self_attn.v_proj.bias", &qkv_b[2]),
        ];
        for (name, tensor) in pairs {
            put(format!("{hf}.{name}"), tensor.clone());
        }
        let simple = [
            (
                "self_attention/linear_1/weight",
                "self_attn.out_proj.weight",
            ),
            ("self_attention/linear_1/bias", "self_attn.out_proj.bias"),
            (
                "self_attention/layer_norm/gamma",
                "self_attn_layer_norm.weight",
            ),
            (
                "self_attention/layer_norm/beta",
                "self_attn_layer_norm.bias",
            ),
            ("ffn/linear_0/weight", "fc1.weight"),
            ("ffn/linear_0/bias", "fc1.bias"),
            ("ffn/linear_1/weight", "fc2.weight"),
            ("ffn/linear_1/bias", "fc2.bias"),
            ("ffn/layer_norm/gamma", "final_layer_norm.weight"),
            ("ffn/layer_norm/beta", "final_layer_norm.bias"),
        ];
        for (c, h) in simple {
            put(format!("{hf}.{h}"), t(&format!("{ct}/{c}"))?);
        }
        Ok(())
    };
    for i in 0..encoder_layers {
        block(
            &format!("encoder/layer_{i}"),
            &format!("model.encoder.layers.{i}"),
        )?;
    }
    for i in 0..decoder_layers {
        block(
            &format!("decoder/layer_{i}"),
            &format!("model.decoder.layers.{i}"),
        )?;
    }
    for i in 0..decoder_layers {
        let (ct, hf) = (
            format!("decoder/layer_{i}/attention"),
            format!("model.decoder.layers.{i}.encoder_attn"),
        );
        let kv_w = split(&format!("{ct}/linear_1/weight"), 2)?;
        let kv_b = split(&format!("{ct}/linear_1/bias"), 2)?;
        put(format!("{hf}.k_proj.weight"), kv_w[0].clone());
        put(format!("{hf}.v_proj.weight"), kv_w[1].clone());
        put(format!("{hf}.v_proj.bias"), kv_b[1].clone());
        put(
            format!("{hf}.q_proj.weight"),
            t(&format!("{ct}/linear_0/weight"))?,
        );
        put(
            format!("{hf}.q_proj.bias"),
            t(&format!("{ct}/linear_0/bias"))?,
        );
        put(
            format!("{hf}.out_proj.weight"),
            t(&format!("{ct}/linear_2/weight"))?,
        );
        put(
            format!("{hf}.out_proj.bias"),
            t(&format!("{ct}/linear_2/bias"))?,
        );
        put(
            format!("model.decoder.layers.{i}.encoder_attn_layer_norm.weight"),
            t(&format!("{ct}/layer_norm/gamma"))?,
        );
        put(
            format!("model.decoder.layers.{i}.encoder_attn_layer_norm.bias"),
            t(&format!("{ct}/layer_norm/beta"))?,
        );
    }
    // safetensors wants contiguous storage; narrowed views are copied here.
    let out = out
        .into_iter()
        .map(|(k, v)| Ok((k, v.contiguous()?)))
        .collect::<Result<HashMap<_, _>, candle_core::Error>>()?;
    let shape = ConvertedShape {
        d_model,
        encoder_layers,
        decoder_layers,
        encoder_heads,
        decoder_heads,
        vocab_size,
        num_mel_bins,
        // OpenAI's rule: English-only checkpoints have 51864 tokens.
        multilingual: vocab_size != 51_864,
    };
    Ok((out, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn var(out: &mut Vec<u8>, n: &str, dims: &[u32], dtype: u8, bytes: &[u8]) {
        name(out, n);
        out.push(dims.len() as u8);
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.push(dtype);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }

    fn header(out: &mut Vec<u8>, vars: u32) {
        out.extend_from_slice(&6u32.to_le_bytes());
        name(out, "WhisperSpec");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&vars.to_le_bytes());
    }

    #[test]
    fn parses_variables_scalars_and_aliases() {
        let mut b = Vec::new();
        header(&mut b, 2);
        var(&mut b, "encoder/num_heads", &[], 2, &6i16.to_le_bytes());
        let w: Vec<u8> = [1.0f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        var(&mut b, "decoder/embeddings/weight", &[1, 2], 0, &w);
        b.extend_from_slice(&1u32.to_le_bytes());
        name(&mut b, "decoder/projection/weight");
        name(&mut b, "decoder/embeddings/weight");

        let m = Ct2Model::parse(&b, Path::new("model.bin")).unwrap();
        assert_eq!(m.spec, "WhisperSpec");
        assert_eq!(m.revision, 3);
        assert_eq!(m.variables["encoder/num_heads"].scalar(), Some(6));
        let p = m
            .tensor("decoder/projection/weight", Path::new("x"))
            .unwrap();
        assert_eq!(p.to_vec2::<f32>().unwrap(), [[1.0, -2.0]]);
    }

    #[test]
    fn dequantizes_int8_rows_with_their_scale() {
        let mut b = Vec::new();
        header(&mut b, 2);
        var(&mut b, "w", &[2, 2], 1, &[10, 246, 127, 0]); // 10, -10, 127, 0
        let s: Vec<u8> = [10.0f32, 127.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        var(&mut b, "w_scale", &[2], 0, &s);
        b.extend_from_slice(&0u32.to_le_bytes());
        let m = Ct2Model::parse(&b, Path::new("model.bin")).unwrap();
        let w = m.tensor("w", Path::new("x")).unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), [[1.0, -1.0], [1.0, 0.0]]);
    }

    #[test]
    fn rejects_truncated_and_inconsistent_input_without_panicking() {
        let mut b = Vec::new();
        header(&mut b, 1);
        var(&mut b, "w", &[4], 0, &[0; 16]);
        b.extend_from_slice(&0u32.to_le_bytes());
        assert!(Ct2Model::parse(&b, Path::new("m")).is_ok());
        // Every prefix is an error, never a panic.
        for cut in 0..b.len() {
            assert!(Ct2Model::parse(&b[..cut], Path::new("m")).is_err(), "{cut}");
        }
        // A byte count that disagrees with the shape.
        let mut c = Vec::new();
        header(&mut c, 1);
        var(&mut c, "w", &[5], 0, &[0; 16]);
        let e = Ct2Model::parse(&c, Path::new("m")).unwrap_err().to_string();
        assert!(e.contains("do not hold"), "{e}");
        // An unknown version, on an otherwise valid file.
        let mut d = b.clone();
        d[0] = 9;
        let e = Ct2Model::parse(&d, Path::new("m")).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
        // A huge variable count.
        let mut e2 = Vec::new();
        header(&mut e2, u32::MAX);
        assert!(Ct2Model::parse(&e2, Path::new("m")).is_err());
    }
}
