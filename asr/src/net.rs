//! Whisper's network on candle, written for serving: the weights are
//! immutable and shared (`Net` is `Send + Sync`), and each decode carries its
//! own state ([`DecodeState`]) with a self-attention key/value cache, so a
//! step feeds only the new token instead of re-running the whole prefix.
//!
//! It reads the published Hugging Face tensor names, from safetensors in
//! f32/f16 or from a GGUF file whose matrices are quantized (q8_0, q4_0:
//! the edge tier), through [`Weights`]. At load time the self-attention
//! q/k/v projections are fused into one matrix, and the attention scale
//! `1/sqrt(d_head)` is folded into the query weights (Whisper scales q and k
//! by `d_head^-1/4` each; the key has no bias, so this is the same); fused
//! quantized matrices are dequantized, joined and quantized again in their
//! own scheme (blocks run along rows, and the scale is a power of two for
//! Whisper's 64-wide heads, so nothing is lost). Activations use the exact
//! (erf) GELU, as OpenAI's model does. Every call takes a batch dimension:
//! rows are independent utterances.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Result, Shape, Tensor};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::whisper::Config;
use candle_transformers::quantized_var_builder::VarBuilder as GgufVarBuilder;

use crate::kernels;

/// Where a [`Net`]'s tensors come from.
#[derive(Clone)]
pub enum Weights<'a> {
    /// Published safetensors, in the dtype the builder was opened with.
    Float(VarBuilder<'a>),
    /// A GGUF file: matrices stay quantized, everything else is read as f32.
    Gguf(GgufVarBuilder),
}

impl Weights<'_> {
    fn pp(&self, name: impl ToString) -> Self {
        match self {
            Weights::Float(vb) => Weights::Float(vb.pp(name)),
            Weights::Gguf(vb) => Weights::Gguf(vb.pp(name)),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Weights::Float(vb) => vb.device(),
            Weights::Gguf(vb) => vb.device(),
        }
    }

    /// A tensor as plain values (a quantized one dequantized).
    fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        match self {
            Weights::Float(vb) => vb.get(shape, name),
            Weights::Gguf(vb) => vb.get(shape, name)?.dequantize(vb.device()),
        }
    }

    /// A tensor's dimensions, whatever they are.
    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        match self {
            Weights::Float(vb) => Ok(vb.get_unchecked(name)?.dims().to_vec()),
            Weights::Gguf(vb) => Ok(vb.get_no_shape(name)?.shape().dims().to_vec()),
        }
    }

    /// The scheme a matrix is quantized in (`None`: plain values).
    fn scheme(&self, name: &str) -> Result<Option<GgmlDType>> {
        match self {
            Weights::Float(_) => Ok(None),
            Weights::Gguf(vb) => Ok(quantized(vb.get_no_shape(name)?.dtype())),
        }
    }
}

fn quantized(dtype: GgmlDType) -> Option<GgmlDType> {
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
        q => Some(q),
    }
}

/// A linear layer applied to every position of every row as one matrix
/// product: `(B, L, D)` is flattened to `(B*L, D)` first. (candle's
/// `Linear` broadcasts the weight over the batch instead, one product per
/// row, which reads the weights once per row: batching would save nothing.)
enum Dense {
    Float(Linear),
    /// Quantized weights (the product quantizes its input rows to 8 bits
    /// and multiplies in integers) and a plain bias.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl Dense {
    /// `weight` `(rows, cols)` and `bias`, quantized in `scheme` if given.
    fn new(weight: Tensor, bias: Option<Tensor>, scheme: Option<GgmlDType>) -> Result<Dense> {
        match scheme {
            None => Ok(Dense::Float(Linear::new(weight, bias))),
            Some(scheme) => Ok(Dense::Quantized {
                weight: QMatMul::from_arc(Arc::new(QTensor::quantize(&weight, scheme)?))?,
                bias,
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match *x.dims() {
            [b, l, d] => {
                let y = self.forward_2d(&x.reshape((b * l, d))?)?;
                let out = y.dim(1)?;
                y.reshape((b, l, out))
            }
            _ => self.forward_2d(x),
        }
    }

    fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Dense::Float(linear) => linear.forward(x),
            Dense::Quantized { weight, bias } => {
                let y = weight.forward(x)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

fn linear(vb: &Weights, rows: usize, cols: usize, bias: bool) -> Result<Dense> {
    let b = if bias {
        Some(vb.get(rows, "bias")?)
    } else {
        None
    };
    match vb {
        // Kept as stored: no dequantize and quantize again.
        Weights::Gguf(q) if vb.scheme("weight")?.is_some() => Ok(Dense::Quantized {
            weight: QMatMul::from_arc(q.get((rows, cols), "weight")?)?,
            bias: b,
        }),
        _ => Dense::new(vb.get((rows, cols), "weight")?, b, None),
    }
}

/// A linear layer whose weight and bias are multiplied by `scale`.
fn scaled_linear(vb: &Weights, rows: usize, cols: usize, scale: f64) -> Result<Dense> {
    Dense::new(
        (vb.get((rows, cols), "weight")? * scale)?,
        Some((vb.get(rows, "bias")? * scale)?),
        vb.scheme("weight")?,
    )
}

fn layer_norm(vb: &Weights, size: usize) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        1e-5,
    ))
}

/// The MLP's width, read off the first layer (Whisper's is `4 * d`).
fn ffn_dim(stack: &Weights, d: usize) -> usize {
    stack
        .pp("layers.0.fc1")
        .dims("weight")
        .ok()
        .and_then(|dims| dims.first().copied())
        .unwrap_or(4 * d)
}

/// q, k and v of one attention in a single matrix: `[q * s; k; v]`.
fn fused_qkv(vb: &Weights, d: usize, scale: f64) -> Result<Dense> {
    let q = vb.pp("q_proj");
    let (k, v) = (vb.pp("k_proj"), vb.pp("v_proj"));
    let w = Tensor::cat(
        &[
            (q.get((d, d), "weight")? * scale)?,
            k.get((d, d), "weight")?,
            v.get((d, d), "weight")?,
        ],
        0,
    )?;
    let zeros = Tensor::zeros(d, w.dtype(), w.device())?;
    let b = Tensor::cat(&[(q.get(d, "bias")? * scale)?, zeros, v.get(d, "bias")?], 0)?;
    Dense::new(w, Some(b), q.scheme("weight")?)
}

/// `(B, L, H*dh)` to `(B, H, L, dh)`, contiguous.
fn heads(x: &Tensor, n_head: usize) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    x.reshape((b, l, n_head, d / n_head))?
        .transpose(1, 2)?
        .contiguous()
}

/// Scaled dot-product attention; `q` is pre-scaled. Returns `(B, Lq, D)`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let mut w = q.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        w = w.broadcast_add(mask)?;
    }
    mix(&w, v)
}

/// Attention scores `(B, H, Lq, Lk)` softmaxed and applied to `v`.
fn mix(scores: &Tensor, v: &Tensor) -> Result<Tensor> {
    let w = kernels::softmax_last_dim(scores)?;
    let (b, h, l, dh) = (w.dim(0)?, w.dim(1)?, w.dim(2)?, v.dim(3)?);
    w.matmul(v)?.transpose(1, 2)?.reshape((b, l, h * dh))
}

/// Splits a fused `(B, L, 3D)` projection into per-head q, k, v.
fn split_qkv(qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let d = qkv.dim(D::Minus1)? / 3;
    Ok((
        heads(&qkv.narrow(D::Minus1, 0, d)?, n_head)?,
        heads(&qkv.narrow(D::Minus1, d, d)?, n_head)?,
        heads(&qkv.narrow(D::Minus1, 2 * d, d)?, n_head)?,
    ))
}

struct Mlp {
    ln: LayerNorm,
    fc1: Dense,
    fc2: Dense,
}

impl Mlp {
    fn load(vb: &Weights, d: usize, ffn: usize) -> Result<Self> {
        Ok(Mlp {
            ln: layer_norm(&vb.pp("final_layer_norm"), d)?,
            fc1: linear(&vb.pp("fc1"), ffn, d, true)?,
            fc2: linear(&vb.pp("fc2"), d, ffn, true)?,
        })
    }

    fn residual(&self, x: &Tensor) -> Result<Tensor> {
        let h = kernels::gelu_erf(&self.fc1.forward(&self.ln.forward(x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

struct EncoderLayer {
    ln: LayerNorm,
    qkv: Dense,
    out: Dense,
    mlp: Mlp,
}

struct Encoder {
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    n_head: usize,
}

struct DecoderLayer {
    self_ln: LayerNorm,
    self_qkv: Dense,
    self_out: Dense,
    cross_ln: LayerNorm,
    cross_q: Dense,
    cross_out: Dense,
    mlp: Mlp,
}

/// The token embedding, which is also the output projection (tied).
enum Embedding {
    /// On the CPU in f32. Each decoding step reads all of it (vocabulary x
    /// width, 80 MB for tiny) for its logits. For one row a plain
    /// matrix-vector product over it, split across threads, runs at memory
    /// speed, where a general matrix product packs it first; for a batch,
    /// the general product (vectorised for the CPU at run time) wins.
    Host {
        matrix: Tensor,
        dim: usize,
    },
    Device(Tensor),
}

impl Embedding {
    fn new(t: Tensor) -> Result<Embedding> {
        if t.device().is_cpu() && t.dtype() == DType::F32 {
            let dim = t.dim(1)?;
            Ok(Embedding::Host {
                matrix: t.contiguous()?,
                dim,
            })
        } else {
            Ok(Embedding::Device(t))
        }
    }

    /// Rows for `tokens` `(B, L)`, as `(B, L, D)`.
    fn lookup(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        let (Embedding::Device(t) | Embedding::Host { matrix: t, .. }) = self;
        t.index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, l, ()))
    }

    /// Logits `(B, V)` for hidden states `(B, D)`.
    fn project(&self, h: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Device(t) => t.matmul(&h.t()?)?.t()?.to_dtype(DType::F32),
            Embedding::Host { matrix, .. } if h.dim(0)? > 1 => {
                // (V, D) x (D, B): the vocabulary as the long side, which
                // the kernels split best.
                matrix
                    .matmul(&h.to_dtype(DType::F32)?.t()?)?
                    .t()?
                    .contiguous()
            }
            Embedding::Host { matrix, dim } => {
                let hidden: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if hidden.len() != *dim {
                    candle_core::bail!("hidden width {} for an embedding of {dim}", hidden.len());
                }
                let (storage, layout) = matrix.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("host embedding is not on the CPU");
                };
                let rows = &cpu.as_slice::<f32>()?[layout.start_offset()..];
                let vocab = matrix.dim(0)?;
                let mut out = vec![0f32; vocab];
                let threads = candle_core::utils::get_num_threads().clamp(1, 16);
                let per = vocab.div_ceil(threads);
                std::thread::scope(|s| {
                    for (n, chunk) in out.chunks_mut(per).enumerate() {
                        let rows = &rows[n * per * dim..];
                        let hidden = &hidden;
                        s.spawn(move || {
                            for (i, logit) in chunk.iter_mut().enumerate() {
                                *logit = dot(&rows[i * dim..(i + 1) * dim], hidden);
                            }
                        });
                    }
                });
                Tensor::from_vec(out, (1, vocab), h.device())
            }
        }
    }
}

/// A dot product in 16 independent lanes, which the compiler vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

struct Decoder {
    /// Every layer's cross-attention keys and values in one matrix
    /// `[k_0; v_0; k_1; v_1; ...]`: the audio is projected for all layers
    /// in one product when decoding starts.
    cross_kv: Dense,
    embed: Embedding,
    positions: Tensor,
    layers: Vec<DecoderLayer>,
    ln: LayerNorm,
    n_head: usize,
}

/// Whisper's encoder and decoder weights.
pub struct Net {
    encoder: Encoder,
    decoder: Decoder,
    max_target: usize,
    device: Device,
}

/// One batch's decoding state: the cross-attention keys and values of its
/// audio, and the self-attention cache of the tokens fed so far.
pub struct DecodeState {
    cross: Vec<(Tensor, Tensor)>,
    cache: Vec<KvCache>,
    position: usize,
}

impl DecodeState {
    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl Net {
    /// Loads the published tensors (`model.encoder.*`, `model.decoder.*`).
    pub fn load(vb: &Weights, cfg: &Config) -> Result<Net> {
        let d = cfg.d_model;
        let enc_vb = vb.pp("model.encoder");
        let conv = |name: &str, cin: usize, stride: usize| -> Result<Conv1d> {
            let c = enc_vb.pp(name);
            let config = Conv1dConfig {
                padding: 1,
                stride,
                groups: 1,
                dilation: 1,
                cudnn_fwd_algo: None,
            };
            Ok(Conv1d::new(
                c.get((d, cin, 3), "weight")?,
                Some(c.get(d, "bias")?),
                config,
            ))
        };
        let enc_scale = 1.0 / ((d / cfg.encoder_attention_heads) as f64).sqrt();
        let enc_ffn = ffn_dim(&enc_vb, d);
        let encoder = Encoder {
            conv1: conv("conv1", cfg.num_mel_bins, 1)?,
            conv2: conv("conv2", d, 2)?,
            positions: enc_vb.get((cfg.max_source_positions, d), "embed_positions.weight")?,
            layers: (0..cfg.encoder_layers)
                .map(|i| {
                    let l = enc_vb.pp(format!("layers.{i}"));
                    Ok(EncoderLayer {
                        ln: layer_norm(&l.pp("self_attn_layer_norm"), d)?,
                        qkv: fused_qkv(&l.pp("self_attn"), d, enc_scale)?,
                        out: linear(&l.pp("self_attn.out_proj"), d, d, true)?,
                        mlp: Mlp::load(&l, d, enc_ffn)?,
                    })
                })
                .collect::<Result<_>>()?,
            ln_post: layer_norm(&enc_vb.pp("layer_norm"), d)?,
            n_head: cfg.encoder_attention_heads,
        };

        let dec_vb = vb.pp("model.decoder");
        let dec_scale = 1.0 / ((d / cfg.decoder_attention_heads) as f64).sqrt();
        let dec_ffn = ffn_dim(&dec_vb, d);
        let mut kv_weights = Vec::new();
        let mut kv_biases = Vec::new();
        for i in 0..cfg.decoder_layers {
            let c = dec_vb.pp(format!("layers.{i}.encoder_attn"));
            kv_weights.push(c.pp("k_proj").get((d, d), "weight")?);
            kv_weights.push(c.pp("v_proj").get((d, d), "weight")?);
            let v_bias = c.pp("v_proj").get(d, "bias")?;
            kv_biases.push(Tensor::zeros(d, v_bias.dtype(), v_bias.device())?);
            kv_biases.push(v_bias);
        }
        let kv_scheme = dec_vb.pp("layers.0.encoder_attn.k_proj").scheme("weight")?;
        let decoder = Decoder {
            cross_kv: Dense::new(
                Tensor::cat(&kv_weights, 0)?,
                Some(Tensor::cat(&kv_biases, 0)?),
                kv_scheme,
            )?,
            embed: Embedding::new(dec_vb.get((cfg.vocab_size, d), "embed_tokens.weight")?)?,
            positions: dec_vb.get((cfg.max_target_positions, d), "embed_positions.weight")?,
            layers: (0..cfg.decoder_layers)
                .map(|i| {
                    let l = dec_vb.pp(format!("layers.{i}"));
                    let c = l.pp("encoder_attn");
                    let cross_q = scaled_linear(&c.pp("q_proj"), d, d, dec_scale)?;
                    Ok(DecoderLayer {
                        self_ln: layer_norm(&l.pp("self_attn_layer_norm"), d)?,
                        self_qkv: fused_qkv(&l.pp("self_attn"), d, dec_scale)?,
                        self_out: linear(&l.pp("self_attn.out_proj"), d, d, true)?,
                        cross_ln: layer_norm(&l.pp("encoder_attn_layer_norm"), d)?,
                        cross_q,
                        cross_out: linear(&c.pp("out_proj"), d, d, true)?,
                        mlp: Mlp::load(&l, d, dec_ffn)?,
                    })
                })
                .collect::<Result<_>>()?,
            ln: layer_norm(&dec_vb.pp("layer_norm"), d)?,
            n_head: cfg.decoder_attention_heads,
        };
        Ok(Net {
            encoder,
            decoder,
            max_target: cfg.max_target_positions,
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' element type (the encoder's input must match).
    pub fn dtype(&self) -> DType {
        self.encoder.positions.dtype()
    }

    /// Log-mel `(B, n_mels, frames)` to audio features `(B, frames/2, D)`.
    pub fn encode(&self, mel: &Tensor) -> Result<Tensor> {
        let e = &self.encoder;
        let x = kernels::gelu_erf(&e.conv1.forward(mel)?)?;
        let x = kernels::gelu_erf(&e.conv2.forward(&x)?)?.transpose(1, 2)?;
        let len = x.dim(1)?;
        if len > e.positions.dim(0)? {
            candle_core::bail!("{len} audio positions exceed the encoder's context");
        }
        let mut x = x.broadcast_add(&e.positions.narrow(0, 0, len)?)?;
        for layer in &e.layers {
            let (q, k, v) = split_qkv(&layer.qkv.forward(&layer.ln.forward(&x)?)?, e.n_head)?;
            let a = attend(&q, &k, &v, None)?;
            x = layer.mlp.residual(&(&x + layer.out.forward(&a)?)?)?;
        }
        e.ln_post.forward(&x)
    }

    /// A fresh decoding state for audio features `(B, S, D)`.
    pub fn start(&self, features: &Tensor) -> Result<DecodeState> {
        let n_head = self.decoder.n_head;
        let kv = self.decoder.cross_kv.forward(features)?;
        let d = kv.dim(D::Minus1)? / (2 * self.decoder.layers.len());
        let cross = (0..self.decoder.layers.len())
            .map(|i| {
                Ok((
                    heads(&kv.narrow(D::Minus1, 2 * i * d, d)?, n_head)?,
                    heads(&kv.narrow(D::Minus1, (2 * i + 1) * d, d)?, n_head)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(DecodeState {
            cross,
            cache: (0..self.decoder.layers.len())
                .map(|_| KvCache::new(2, self.max_target))
                .collect(),
            position: 0,
        })
    }

    /// Feeds `tokens` `(B, L)` after those already in `state`; returns the
    /// decoder's hidden states `(B, L, D)` for them.
    pub fn step(&self, state: &mut DecodeState, tokens: &Tensor) -> Result<Tensor> {
        self.step_capturing(state, tokens, &[], &mut Vec::new())
    }

    /// The raw (scaled, pre-softmax) cross-attention scores `(L, S)` of
    /// the `(layer, head)` pairs in `wanted`, for `tokens` `(1, L)` fed
    /// from the start against row `row` of `state`'s audio. `state` itself
    /// is left as it is: this is the extra pass word timestamps make.
    pub fn cross_attention(
        &self,
        state: &DecodeState,
        row: usize,
        tokens: &Tensor,
        wanted: &[(usize, usize)],
    ) -> Result<Vec<Tensor>> {
        let mut fresh = DecodeState {
            cross: state
                .cross
                .iter()
                .map(|(k, v)| Ok((k.narrow(0, row, 1)?, v.narrow(0, row, 1)?)))
                .collect::<Result<_>>()?,
            cache: (0..self.decoder.layers.len())
                .map(|_| KvCache::new(2, self.max_target))
                .collect(),
            position: 0,
        };
        let mut captured = Vec::with_capacity(wanted.len());
        self.step_capturing(&mut fresh, tokens, wanted, &mut captured)?;
        Ok(captured)
    }

    /// [`Net::step`], also pushing onto `captured` the cross-attention
    /// scores of row 0 for each `(layer, head)` in `wanted`, in its order.
    fn step_capturing(
        &self,
        state: &mut DecodeState,
        tokens: &Tensor,
        wanted: &[(usize, usize)],
        captured: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let dec = &self.decoder;
        let mut slots: Vec<Option<Tensor>> = vec![None; wanted.len()];
        let l = tokens.dim(1)?;
        let p0 = state.position;
        if p0 + l > self.max_target {
            candle_core::bail!("decoder context of {} tokens exceeded", self.max_target);
        }
        let embedded = dec.embed.lookup(tokens)?;
        let mut x = embedded.broadcast_add(&dec.positions.narrow(0, p0, l)?)?;
        // New token i (at p0 + i) may see keys 0..=p0 + i.
        let mask = if l > 1 {
            let m: Vec<f32> = (0..l)
                .flat_map(|i| {
                    (0..p0 + l).map(move |j| if j > p0 + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (l, p0 + l), &self.device)?.to_dtype(x.dtype())?)
        } else {
            None
        };
        for (index, ((layer, cache), (ck, cv))) in dec
            .layers
            .iter()
            .zip(state.cache.iter_mut())
            .zip(state.cross.iter())
            .enumerate()
        {
            let (q, k, v) = split_qkv(
                &layer.self_qkv.forward(&layer.self_ln.forward(&x)?)?,
                dec.n_head,
            )?;
            let (k, v) = cache.append(&k, &v)?;
            let a = attend(&q, &k, &v, mask.as_ref())?;
            x = (&x + layer.self_out.forward(&a)?)?;
            let q = heads(
                &layer.cross_q.forward(&layer.cross_ln.forward(&x)?)?,
                dec.n_head,
            )?;
            let scores = q.matmul(&ck.t()?)?;
            for (slot, &(at, head)) in slots.iter_mut().zip(wanted) {
                if at == index {
                    *slot = Some(scores.i((0, head))?.to_dtype(DType::F32)?);
                }
            }
            let a = mix(&scores, cv)?;
            x = layer.mlp.residual(&(&x + layer.cross_out.forward(&a)?)?)?;
        }
        state.position += l;
        for (slot, (layer, head)) in slots.into_iter().zip(wanted) {
            match slot {
                Some(t) => captured.push(t),
                None => candle_core::bail!("no attention head {head} in decoder layer {layer}"),
            }
        }
        dec.ln.forward(&x)
    }

    /// Logits `(B, V)` for the hidden state at position `at` of each row
    /// (the output projection is the token embedding, tied).
    pub fn logits_at(&self, hidden: &Tensor, at: usize) -> Result<Tensor> {
        let h = hidden.i((.., at, ..))?.contiguous()?;
        self.decoder.embed.project(&h)
    }
}
