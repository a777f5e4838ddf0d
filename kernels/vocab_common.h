// Streaming (online) reductions over one vocabulary row, shared by the Metal and CUDA kernels.
//
// Each thread folds its strided share of the row into a small state, each element read once;
// states are then merged by a fixed xor-butterfly inside each 32-lane warp/simdgroup and a
// second butterfly over the per-warp results. No atomics, no reused shared buffer: the same
// input gives bit-identical output on every call.
//
// Entropy state (m, s, w): m the running max, s = sum e^(z-m), w = sum e^(z-m) (z-m).
//   lse = m + log s,  H = log s - w / s   (SPEC 3.1; w is relative to m, so +-1e4 logits
//   do not cancel against lse).
// KL state (ma, sa, u, mb, sb): u = sum e^(a-ma) (a-b).
//   KL = u/sa + (mb - ma) + log(sb/sa)   (SPEC 3.3; exactly 0 when a == b).
// -inf logits contribute nothing; an all -inf row gives lse = -inf and H/KL = NaN.

struct MlxgEnt {
  float m;
  float s;
  float w;
};

KFN MlxgEnt mlxg_ent_init() {
  MlxgEnt r;
  r.m = -MLXG_INF;
  r.s = 0.0f;
  r.w = 0.0f;
  return r;
}

// Re-express the state relative to a new max mn >= r.m.
KFN MlxgEnt mlxg_ent_rescale(MlxgEnt r, float mn) {
  if (r.s > 0.0f) {  // s == 0: nothing accumulated yet, m may still be -inf
    float d = r.m - mn;
    float a = MLXG_EXP(d);
    // a == 0 (old max >= ~104 nats below, e.g. logits masked with -FLT_MAX): the old terms
    // vanish, and d * s may overflow to -inf, which a * (...) would turn into NaN.
    r.w = (a > 0.0f) ? a * (r.w + d * r.s) : 0.0f;
    r.s = a * r.s;
  }
  r.m = mn;
  return r;
}

// Fold one value z <= r.m in; the caller has checked r.m > -inf. The hot loop: a -inf z
// gives e = 0 and, clamped, t = -FLT_MAX, so e * t = 0 rather than NaN; a NaN z makes s NaN
// (and so every output).
KFN MlxgEnt mlxg_ent_add(MlxgEnt r, float z) {
  float t = z - r.m;
  float e = MLXG_EXP_FAST(t);
  r.s += e;
  r.w += e * MLXG_FMAX(t, -MLXG_FLT_MAX);
  return r;
}

KFN MlxgEnt mlxg_ent_merge(MlxgEnt x, MlxgEnt y) {
  float mn = (y.m > x.m) ? y.m : x.m;
  x = mlxg_ent_rescale(x, mn);
  y = mlxg_ent_rescale(y, mn);
  x.s += y.s;
  x.w += y.w;
  return x;
}

KFN MlxgEnt mlxg_ent_warp_reduce(MlxgEnt r) {
  for (int off = 16; off > 0; off >>= 1) {
    MlxgEnt o;
    o.m = MLXG_SHFL_XOR(r.m, off);
    o.s = MLXG_SHFL_XOR(r.s, off);
    o.w = MLXG_SHFL_XOR(r.w, off);
    r = mlxg_ent_merge(r, o);
  }
  return r;
}

struct MlxgKl {
  float ma;
  float sa;
  float u;
  float mb;
  float sb;
};

KFN MlxgKl mlxg_kl_init() {
  MlxgKl r;
  r.ma = -MLXG_INF;
  r.sa = 0.0f;
  r.u = 0.0f;
  r.mb = -MLXG_INF;
  r.sb = 0.0f;
  return r;
}

KFN MlxgKl mlxg_kl_rescale_a(MlxgKl r, float mn) {
  if (r.sa > 0.0f) {
    float a = MLXG_EXP(r.ma - mn);
    r.sa *= a;
    r.u = (a > 0.0f) ? r.u * a : 0.0f;  // u may be -inf (pairs at a -FLT_MAX max): not NaN
  }
  r.ma = mn;
  return r;
}

KFN MlxgKl mlxg_kl_rescale_b(MlxgKl r, float mn) {
  if (r.sb > 0.0f) {
    r.sb *= MLXG_EXP(r.mb - mn);
  }
  r.mb = mn;
  return r;
}

// Fold one pair in (a <= r.ma, b <= r.mb; the caller has checked both maxima > -inf).
// b = -inf where p > 0 makes u (and KL) +inf; where p = 0 the pair adds nothing.
KFN MlxgKl mlxg_kl_add(MlxgKl r, float a, float b) {
  float ea = MLXG_EXP_FAST(a - r.ma);
  r.sa += ea;
  r.u += (ea > 0.0f) ? ea * (a - b) : 0.0f;
  r.sb += MLXG_EXP_FAST(b - r.mb);
  return r;
}

// The same with each side guarded on its own: one of the two maxima may still be -inf.
KFN MlxgKl mlxg_kl_add_slow(MlxgKl r, float a, float b) {
  float ea = (a == -MLXG_INF) ? 0.0f : MLXG_EXP(a - r.ma);
  r.sa += ea;
  r.u += (ea > 0.0f) ? ea * (a - b) : 0.0f;
  r.sb += (b == -MLXG_INF) ? 0.0f : MLXG_EXP(b - r.mb);
  return r;
}

KFN MlxgKl mlxg_kl_merge(MlxgKl x, MlxgKl y) {
  float na = (y.ma > x.ma) ? y.ma : x.ma;
  float nb = (y.mb > x.mb) ? y.mb : x.mb;
  x = mlxg_kl_rescale_b(mlxg_kl_rescale_a(x, na), nb);
  y = mlxg_kl_rescale_b(mlxg_kl_rescale_a(y, na), nb);
  x.sa += y.sa;
  x.u += y.u;
  x.sb += y.sb;
  return x;
}

KFN MlxgKl mlxg_kl_warp_reduce(MlxgKl r) {
  for (int off = 16; off > 0; off >>= 1) {
    MlxgKl o;
    o.ma = MLXG_SHFL_XOR(r.ma, off);
    o.sa = MLXG_SHFL_XOR(r.sa, off);
    o.u = MLXG_SHFL_XOR(r.u, off);
    o.mb = MLXG_SHFL_XOR(r.mb, off);
    o.sb = MLXG_SHFL_XOR(r.sb, off);
    r = mlxg_kl_merge(r, o);
  }
  return r;
}

// One VEC-wide step of kl_fwd over float va[VEC], vb[VEC] (a macro: VEC is the kernel's
// template constant, and Metal wants no array parameters): move to the step's maxima, then
// fold the pairs in.
#define MLXG_KL_STEP(st, va, vb) \
  { \
    float ca_ = va[0]; \
    float cb_ = vb[0]; \
    MLXG_UNROLL for (int k_ = 1; k_ < VEC; ++k_) { \
      ca_ = (va[k_] > ca_) ? va[k_] : ca_; \
      cb_ = (vb[k_] > cb_) ? vb[k_] : cb_; \
    } \
    if (ca_ > st.ma) st = mlxg_kl_rescale_a(st, ca_); \
    if (cb_ > st.mb) st = mlxg_kl_rescale_b(st, cb_); \
    if (st.ma > -MLXG_INF && st.mb > -MLXG_INF) { \
      MLXG_UNROLL for (int k_ = 0; k_ < VEC; ++k_) st = mlxg_kl_add(st, va[k_], vb[k_]); \
    } else { \
      MLXG_UNROLL for (int k_ = 0; k_ < VEC; ++k_) st = mlxg_kl_add_slow(st, va[k_], vb[k_]); \
    } \
  }
