// Torch-facing API of the band + side attention kernels: argument checks, output allocation, the
// side-key chunking choice, and the fixed-order reductions of the partial buffers. Registered as the
// CUDA implementations of longattn::cuda_band_side_fwd / cuda_band_side_bwd (schemas in extension.cpp).
//
// The checks repeat what the Python API validates because the raw ops are callable directly
// (torch.ops.longattn.cuda_band_side_fwd): whatever they are given, the kernels must not read or write
// out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "band_side/launch.h"

namespace longattn {
namespace {

constexpr int kTile = 64;  // BandSideTraits::kBlockM == kBlockN; the host needs it for grid / buffer sizes

bool aligned_for_cp_async(const at::Tensor& t) {
  // cp.async moves 16-byte chunks: the base and every row start must be 16-byte aligned (8 elements).
  if (t.numel() == 0) return true;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// A (B, rows, H, D) operand: checked, and copied (dense) only if its strides break the 16-byte rule.
at::Tensor operand(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rows) {
  TORCH_CHECK(t.device() == q.device(), name, " must be on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == rows && t.size(2) == q.size(2) &&
                  t.size(3) == q.size(3),
              name, " must have shape (", q.size(0), ", ", rows, ", ", q.size(2), ", ", q.size(3), "), got ",
              t.sizes());
  TORCH_CHECK(t.numel() == 0 || t.stride(3) == 1, name, " must have a contiguous last dim");
  return aligned_for_cp_async(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::optional<at::Tensor> mask_arg(const std::optional<at::Tensor>& m, const char* name, const at::Tensor& q,
                                   int64_t cols) {
  if (!m.has_value()) return std::nullopt;
  TORCH_CHECK(m->device() == q.device(), name, " must be on ", q.device());
  TORCH_CHECK(m->scalar_type() == at::kBool, name, " must be bool, got ", m->scalar_type());
  TORCH_CHECK(m->dim() == 2 && m->size(0) == q.size(0) && m->size(1) == cols, name, " must have shape (",
              q.size(0), ", ", cols, "), got ", m->sizes());
  return m->contiguous();
}

std::optional<at::Tensor> table_arg(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& q,
                                    int64_t width) {
  if (!t.has_value()) return std::nullopt;
  TORCH_CHECK(t->device() == q.device(), name, " must be on ", q.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), name, " must be a float tensor, got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 2 && t->size(0) == q.size(2) && t->size(1) == width, name, " must have shape (",
              q.size(2), ", ", width, "), got ", t->sizes());
  return t->to(at::kFloat).contiguous();  // a few KB; the kernels read float32
}

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Everything both passes share: checks + the input half of the params. Tensors that had to be copied or
// converted are kept alive in `keep`.
struct Prepared {
  BandSideParams p{};
  std::vector<at::Tensor> keep;
};

Prepared prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& sk_in,
                 const at::Tensor& sv_in, const std::optional<at::Tensor>& band_key_mask,
                 const std::optional<at::Tensor>& side_mask, const std::optional<at::Tensor>& query_block,
                 const std::optional<at::Tensor>& band_bias, const std::optional<at::Tensor>& side_bias,
                 int64_t left, int64_t right, double scale) {
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16,
              "the CUDA kernels take float16 / bfloat16, got ", q_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 4, "q must be (B, S, H, D), got ", q_in.sizes());
  const int64_t B = q_in.size(0), S = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "head dim must be 32, 64 or 128, got ", D);
  TORCH_CHECK(B <= 65535 && H <= 65535, "B and H must be <= 65535 (grid limits)");
  TORCH_CHECK(S < (int64_t(1) << 30), "S must be < 2^30");
  TORCH_CHECK(sk_in.dim() == 4, "side_k must be (B, G, H, D), got ", sk_in.sizes());
  const int64_t G = sk_in.size(1);
  TORCH_CHECK(G < (int64_t(1) << 28), "G must be < 2^28");
  TORCH_CHECK(S == 0 || (0 <= left && left < S && 0 <= right && right < S), "left and right must be in [0, S - 1]",
              " (S = ", S, "), got ", left, ", ", right);

  Prepared r;
  at::Tensor q = operand(q_in, "q", q_in, S), k = operand(k_in, "k", q_in, S), v = operand(v_in, "v", q_in, S);
  at::Tensor sk = operand(sk_in, "side_k", q_in, G), sv = operand(sv_in, "side_v", q_in, G);
  auto bkm = mask_arg(band_key_mask, "band_key_mask", q_in, S);
  auto sm = mask_arg(side_mask, "side_mask", q_in, G);
  auto bb = table_arg(band_bias, "band_bias", q_in, left + right + 1);
  auto sb = table_arg(side_bias, "side_bias", q_in, 2 * G + 1);
  std::optional<at::Tensor> qb;
  if (sb.has_value()) {
    TORCH_CHECK(query_block.has_value(), "query_block is required with side_bias");
    TORCH_CHECK(query_block->device() == q_in.device() && query_block->scalar_type() == at::kInt &&
                    query_block->dim() == 2 && query_block->size(0) == B && query_block->size(1) == S,
                "query_block must be int32 (B, S) on ", q_in.device());
    qb = query_block->contiguous();  // values are clamped to [-1, G-1] in the kernels
  }
  r.keep = {q, k, v, sk, sv};
  for (auto* t : {&bkm, &sm, &bb, &sb, &qb})
    if (t->has_value()) r.keep.push_back(**t);

  BandSideParams& p = r.p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.side_k = sk.data_ptr();
  p.side_v = sv.data_ptr();
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  p.sk_st = strides_of(sk);
  p.sv_st = strides_of(sv);
  p.band_key_mask = bkm ? reinterpret_cast<const uint8_t*>(bkm->data_ptr<bool>()) : nullptr;
  p.side_mask = sm ? reinterpret_cast<const uint8_t*>(sm->data_ptr<bool>()) : nullptr;
  p.query_block = qb ? qb->data_ptr<int32_t>() : nullptr;
  p.band_bias = bb ? bb->data_ptr<float>() : nullptr;
  p.side_bias = sb ? sb->data_ptr<float>() : nullptr;
  p.B = B;
  p.S = S;
  p.H = H;
  p.G = G;
  p.D = D;
  p.left = left;
  p.right = right;
  p.band_width = left + right + 1;
  p.scale = static_cast<float>(scale);
  return r;
}

std::tuple<at::Tensor, at::Tensor> band_side_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& side_k,
    const at::Tensor& side_v, const std::optional<at::Tensor>& band_key_mask,
    const std::optional<at::Tensor>& side_mask, const std::optional<at::Tensor>& query_block,
    const std::optional<at::Tensor>& band_bias, const std::optional<at::Tensor>& side_bias, int64_t left,
    int64_t right, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left,
                       right, scale);
  BandSideParams& p = r.p;
  at::Tensor out = at::empty({p.B, p.S, p.H, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.S}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  C10_CUDA_CHECK(run_band_side_fwd(p, q.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> band_side_bwd(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& side_k, const at::Tensor& side_v, const at::Tensor& out_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& band_key_mask, const std::optional<at::Tensor>& side_mask,
    const std::optional<at::Tensor>& query_block, const std::optional<at::Tensor>& band_bias,
    const std::optional<at::Tensor>& side_bias, int64_t left, int64_t right, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(q, k, v, side_k, side_v, band_key_mask, side_mask, query_block, band_bias, side_bias, left,
                       right, scale);
  BandSideParams& p = r.p;
  const at::Tensor dout = operand(dout_in, "dout", q, p.S);
  const at::Tensor out = operand(out_in, "out", q, p.S);
  TORCH_CHECK(lse_in.device() == q.device() && lse_in.scalar_type() == at::kFloat && lse_in.dim() == 3 &&
                  lse_in.size(0) == p.B && lse_in.size(1) == p.H && lse_in.size(2) == p.S,
              "lse must be float32 (B, H, S) on ", q.device());
  const at::Tensor lse = lse_in.contiguous();

  const auto opts = q.options();
  const auto fopts = opts.dtype(at::kFloat);
  at::Tensor dq = at::empty({p.B, p.S, p.H, p.D}, opts);
  at::Tensor dk = at::empty_like(dq);
  at::Tensor dv = at::empty_like(dq);
  at::Tensor dbb = band_bias ? at::Tensor() : q.new_empty({0});
  at::Tensor dsb = side_bias ? at::Tensor() : q.new_empty({0});
  if (dq.numel() == 0) {
    at::Tensor dside = at::zeros({p.B, p.G, p.H, p.D}, opts);
    if (band_bias) dbb = at::zeros_like(*band_bias, at::MemoryFormat::Contiguous);
    if (side_bias) dsb = at::zeros_like(*side_bias, at::MemoryFormat::Contiguous);
    return {dq, dk, dv, dside, dside.clone(), dbb, dsb};
  }

  // Side-key tiles get split over chunks of query tiles (float32 partials summed below) so that few side
  // keys still fill the GPU; a chunk is never shorter than a band CTA's walk, which would only add partial
  // traffic without shortening the critical path.
  const int64_t n_query_tiles = (p.S + kTile - 1) / kTile;
  const int64_t n_side_tiles = (p.G + kTile - 1) / kTile;
  int64_t chunks = 1;
  if (n_side_tiles > 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    const int64_t occupancy_chunks = (2 * sms + n_side_tiles * p.B * p.H - 1) / (n_side_tiles * p.B * p.H);
    const int64_t band_walk = (p.left + p.right) / kTile + 2;
    const int64_t chunk_tiles = std::max(band_walk, (n_query_tiles + occupancy_chunks - 1) / occupancy_chunks);
    p.side_chunk_tiles = std::min(chunk_tiles, n_query_tiles);
    chunks = (n_query_tiles + p.side_chunk_tiles - 1) / p.side_chunk_tiles;
  } else {
    p.side_chunk_tiles = 1;
  }
  p.side_chunks = chunks;
  at::Tensor dsk_part = at::empty({chunks, p.B, p.G, p.H, p.D}, fopts);
  at::Tensor dsv_part = at::empty_like(dsk_part);
  // Bias partials: one row per key CTA, accumulated in place by that CTA, hence zero-initialised. Size
  // B*H*ceil(S/64)*(L+R+1) floats for the band table (e.g. 3 MB for LongT5 r=127, S=16384, B*H=12).
  const int64_t n_band_ctas = (p.S + kTile - 1) / kTile;
  at::Tensor dbb_part, dsb_part;
  if (band_bias) dbb_part = at::zeros({p.B, p.H, n_band_ctas, p.band_width}, fopts);
  if (side_bias) dsb_part = at::zeros({p.B, p.H, n_side_tiles * chunks, 2 * p.G + 1}, fopts);
  at::Tensor delta = at::empty({p.B, p.H, p.S}, fopts);

  p.dout = dout.data_ptr();
  p.do_st = strides_of(dout);
  p.o = out.data_ptr();
  p.o_st = strides_of(out);
  p.lse_in = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dsk_partial = dsk_part.data_ptr<float>();
  p.dsv_partial = dsv_part.data_ptr<float>();
  p.dband_bias_partial = band_bias ? dbb_part.data_ptr<float>() : nullptr;
  p.dside_bias_partial = side_bias ? dsb_part.data_ptr<float>() : nullptr;

  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(run_band_side_bwd_delta(p, bf16, stream));
  C10_CUDA_CHECK(run_band_side_bwd_dq(p, bf16, stream));
  C10_CUDA_CHECK(run_band_side_bwd_dkdv(p, bf16, stream));

  // Fixed-order reductions (ATen's sum has no atomics): deterministic run to run.
  at::Tensor dsk = dsk_part.sum(0).to(q.scalar_type());
  at::Tensor dsv = dsv_part.sum(0).to(q.scalar_type());
  if (band_bias) dbb = dbb_part.sum(at::IntArrayRef{0, 2}).to(band_bias->scalar_type());
  if (side_bias) dsb = dsb_part.sum(at::IntArrayRef{0, 2}).to(side_bias->scalar_type());
  return {dq, dk, dv, dsk, dsv, dbb, dsb};
}

}  // namespace

TORCH_LIBRARY_IMPL(longattn, CUDA, m) {
  m.impl("cuda_band_side_fwd", &band_side_fwd);
  m.impl("cuda_band_side_bwd", &band_side_bwd);
}

}  // namespace longattn
