// The fused BN-LSTM layer on the CPU: step kernels and the time loops around them.
//
// Forward, per step: one GEMM for W_hh h_{t-1} (the input branch W_ih x comes from one GEMM over all
// steps, done by the caller), then one parallel pass over blocks of hidden units with every batch row
// inside, which takes both gate-side batch norms, adds the bias, applies the gates, updates c, normalizes
// c and writes h. Backward runs the same pass in reverse and one GEMM per step for dh_{t-1}; the weight
// gradients are large GEMMs after the loop (in bnlstm.cpp). Shapes of every buffer: bnlstm.h.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "bnlstm.h"

namespace fused_bnlstm {

namespace {

// Hidden units a kernel body handles at once; its per-column statistics live on the stack.
constexpr int64_t kBlock = 64;

// exp for float as plain arithmetic (Cephes' polynomial, about 1 ulp), so that the loops around it
// vectorize; libm's expf does not.
inline float exp_fast(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    // Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick (no libm call, vectorizes).
    const float shifter = 12582912.0f;
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

inline float exp_of(float x) { return exp_fast(x); }
inline double exp_of(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid_of(T x) { return T(1) / (T(1) + exp_of(-x)); }

// tanh(x) = 1 - 2 / (exp(2x) + 1): saturates to +-1 without overflow, absolute error about 1 ulp of 1.
inline float tanh_of(float x) { return 1.0f - 2.0f / (exp_fast(2.0f * x) + 1.0f); }
inline double tanh_of(double x) { return std::tanh(x); }

template <typename T>
inline T* ptr(void* p) { return static_cast<T*>(p); }
template <typename T>
inline const T* ptr(const void* p) { return static_cast<const T*>(p); }

// Hidden units per parallel task: enough row-work per task to pay for a thread hand-off.
inline int64_t grain_size(int64_t B, int64_t H) {
    const int64_t per_unit = std::max<int64_t>(B, 1) * 4;
    return std::max<int64_t>(1, std::min<int64_t>(H, 2048 / per_unit));
}

// Mean and biased variance (two passes) over the running rows of n columns of v [B, ld] starting at
// column col, into mean[0..n), var[0..n).
template <typename scalar_t, typename acc_t>
void masked_moments(const scalar_t* v, int64_t ld, int64_t col, int64_t n, int64_t B, const RowMask& running,
                    int64_t t, acc_t count, acc_t* mean, acc_t* var) {
    for (int64_t jj = 0; jj < n; ++jj) mean[jj] = acc_t(0);
    for (int64_t b = 0; b < B; ++b) {
        if (!running(b, t)) continue;
        const scalar_t* row = v + b * ld + col;
        for (int64_t jj = 0; jj < n; ++jj) mean[jj] += acc_t(row[jj]);
    }
    for (int64_t jj = 0; jj < n; ++jj) { mean[jj] /= count; var[jj] = acc_t(0); }
    for (int64_t b = 0; b < B; ++b) {
        if (!running(b, t)) continue;
        const scalar_t* row = v + b * ld + col;
        for (int64_t jj = 0; jj < n; ++jj) {
            const acc_t d = acc_t(row[jj]) - mean[jj];
            var[jj] += d * d;
        }
    }
    for (int64_t jj = 0; jj < n; ++jj) var[jj] /= count;
}

// One step of the forward pass for hidden units [j0, j1) (at most kBlock), every batch row.
template <typename scalar_t>
void forward_block(const ForwardParams& p, int64_t t, int64_t j0, int64_t j1) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t B = p.B, H = p.H, G = 4 * H, n = j1 - j0;
    const bool frame = p.norm == Normalization::kFrame;
    const bool sequence = p.norm == Normalization::kSequence;
    const bool batch = frame && p.step_batch[t];
    const acc_t count = acc_t(p.counts[t]);
    const acc_t eps = acc_t(p.eps);

    scalar_t* a_ih = ptr<scalar_t>(p.a_ih) + t * B * G;  // [B, 4H], becomes xhat_ih or the activations
    const scalar_t* a_hh = ptr<scalar_t>(p.a_hh);        // [B, 4H]
    scalar_t* gates = p.norm == Normalization::kNone ? a_ih
                      : p.save                       ? ptr<scalar_t>(p.gates) + t * B * G
                                                     : ptr<scalar_t>(p.gates);
    scalar_t* xhat_hh = (frame && p.save) ? ptr<scalar_t>(p.xhat_hh) + t * B * G : nullptr;
    scalar_t* xhat_c = (frame && p.save) ? ptr<scalar_t>(p.xhat_c) + t * B * H : nullptr;
    scalar_t* tanh_c = p.save ? ptr<scalar_t>(p.tanh_c) + t * B * H : nullptr;
    const int64_t prev = p.save ? t : (t & 1), next = p.save ? t + 1 : ((t + 1) & 1);
    const scalar_t* h_prev = ptr<scalar_t>(p.hs) + prev * B * H;
    const scalar_t* c_prev = ptr<scalar_t>(p.cs) + prev * B * H;
    scalar_t* h_next = ptr<scalar_t>(p.hs) + next * B * H;
    scalar_t* c_next = ptr<scalar_t>(p.cs) + next * B * H;
    scalar_t* out = ptr<scalar_t>(p.output) + t * B * H;
    const scalar_t* bias = ptr<scalar_t>(p.bias);

    // Per gate column of this block: pre = g_hh * (a_hh - m_hh) * r_hh + g_ih * (a_ih - m_ih) * r_ih + bias.
    acc_t m_ih[4][kBlock], r_ih[4][kBlock], g_ih[4][kBlock];
    acc_t m_hh[4][kBlock], r_hh[4][kBlock], g_hh[4][kBlock], b_g[4][kBlock];
    for (int k = 0; k < 4; ++k) {
        const int64_t col = k * H + j0;
        if (batch) {
            acc_t var_ih[kBlock], var_hh[kBlock];
            masked_moments<scalar_t, acc_t>(a_ih, G, col, n, B, p.running, t, count, m_ih[k], var_ih);
            masked_moments<scalar_t, acc_t>(a_hh, G, col, n, B, p.running, t, count, m_hh[k], var_hh);
            for (int64_t jj = 0; jj < n; ++jj) {
                r_ih[k][jj] = acc_t(1) / std::sqrt(var_ih[jj] + eps);
                r_hh[k][jj] = acc_t(1) / std::sqrt(var_hh[jj] + eps);
                if (p.mean_ih != nullptr) {
                    const int64_t at = t * G + col + jj;
                    ptr<scalar_t>(p.mean_ih)[at] = scalar_t(m_ih[k][jj]);
                    ptr<scalar_t>(p.var_ih)[at] = scalar_t(var_ih[jj]);
                    ptr<scalar_t>(p.mean_hh)[at] = scalar_t(m_hh[k][jj]);
                    ptr<scalar_t>(p.var_hh)[at] = scalar_t(var_hh[jj]);
                }
            }
        } else if (frame) {
            const scalar_t* pm_ih = ptr<scalar_t>(p.pop_mean_ih) + t * G + col;
            const scalar_t* pv_ih = ptr<scalar_t>(p.pop_var_ih) + t * G + col;
            const scalar_t* pm_hh = ptr<scalar_t>(p.pop_mean_hh) + t * G + col;
            const scalar_t* pv_hh = ptr<scalar_t>(p.pop_var_hh) + t * G + col;
            for (int64_t jj = 0; jj < n; ++jj) {
                m_ih[k][jj] = acc_t(pm_ih[jj]);
                r_ih[k][jj] = acc_t(1) / std::sqrt(acc_t(pv_ih[jj]) + eps);
                m_hh[k][jj] = acc_t(pm_hh[jj]);
                r_hh[k][jj] = acc_t(1) / std::sqrt(acc_t(pv_hh[jj]) + eps);
            }
            if (p.mean_ih != nullptr) {
                for (int64_t jj = 0; jj < n; ++jj) {
                    const int64_t at = t * G + col + jj;
                    const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
                    ptr<scalar_t>(p.mean_ih)[at] = nan;
                    ptr<scalar_t>(p.var_ih)[at] = nan;
                    ptr<scalar_t>(p.mean_hh)[at] = nan;
                    ptr<scalar_t>(p.var_hh)[at] = nan;
                }
            }
        } else if (sequence) {
            for (int64_t jj = 0; jj < n; ++jj) {
                m_ih[k][jj] = ptr<acc_t>(p.seq_mean)[col + jj];
                r_ih[k][jj] = ptr<acc_t>(p.seq_rstd)[col + jj];
                m_hh[k][jj] = acc_t(0);
                r_hh[k][jj] = acc_t(1);
            }
        } else {
            for (int64_t jj = 0; jj < n; ++jj) {
                m_ih[k][jj] = m_hh[k][jj] = acc_t(0);
                r_ih[k][jj] = r_hh[k][jj] = acc_t(1);
            }
        }
        for (int64_t jj = 0; jj < n; ++jj) {
            g_ih[k][jj] = (frame || sequence) ? acc_t(ptr<scalar_t>(p.gamma_ih)[col + jj]) : acc_t(1);
            g_hh[k][jj] = frame ? acc_t(ptr<scalar_t>(p.gamma_hh)[col + jj]) : acc_t(1);
            b_g[k][jj] = bias != nullptr ? acc_t(bias[col + jj]) : acc_t(0);
        }
        if (frame && p.save) {
            for (int64_t jj = 0; jj < n; ++jj) {
                ptr<scalar_t>(p.rstd_ih)[t * G + col + jj] = scalar_t(r_ih[k][jj]);
                ptr<scalar_t>(p.rstd_hh)[t * G + col + jj] = scalar_t(r_hh[k][jj]);
            }
        }
    }

    // Gates and the cell update, row by row; finished rows keep their state and output zeros.
    const bool keep_xhat_ih = (frame || sequence) && p.save;
    for (int64_t b = 0; b < B; ++b) {
        if (!p.running(b, t)) {
            for (int64_t jj = 0; jj < n; ++jj) {
                h_next[b * H + j0 + jj] = h_prev[b * H + j0 + jj];
                c_next[b * H + j0 + jj] = c_prev[b * H + j0 + jj];
                out[b * H + j0 + jj] = scalar_t(0);
            }
            continue;
        }
        for (int k = 0; k < 4; ++k) {
            scalar_t* xi = a_ih + b * G + k * H + j0;
            const scalar_t* ah = a_hh + b * G + k * H + j0;
            scalar_t* g = gates + b * G + k * H + j0;
            scalar_t* xh = xhat_hh != nullptr ? xhat_hh + b * G + k * H + j0 : nullptr;
            for (int64_t jj = 0; jj < n; ++jj) {
                const acc_t ni = (acc_t(xi[jj]) - m_ih[k][jj]) * r_ih[k][jj];
                const acc_t nh = (acc_t(ah[jj]) - m_hh[k][jj]) * r_hh[k][jj];
                if (keep_xhat_ih) xi[jj] = scalar_t(ni);
                if (xh != nullptr) xh[jj] = scalar_t(nh);
                g[jj] = scalar_t(g_hh[k][jj] * nh + g_ih[k][jj] * ni + b_g[k][jj]);
            }
            if (k == 2) {
                for (int64_t jj = 0; jj < n; ++jj) g[jj] = scalar_t(tanh_of(acc_t(g[jj])));
            } else {
                for (int64_t jj = 0; jj < n; ++jj) g[jj] = scalar_t(sigmoid_of(acc_t(g[jj])));
            }
        }
        const scalar_t* gi = gates + b * G + j0;
        const scalar_t* gf = gi + H;
        const scalar_t* gg = gi + 2 * H;
        const scalar_t* cp = c_prev + b * H + j0;
        scalar_t* cn = c_next + b * H + j0;
        for (int64_t jj = 0; jj < n; ++jj) {
            cn[jj] = scalar_t(acc_t(gf[jj]) * acc_t(cp[jj]) + acc_t(gi[jj]) * acc_t(gg[jj]));
        }
    }

    // BN(c) over the running rows, then h.
    acc_t m_c[kBlock], r_c[kBlock], g_c[kBlock], b_c[kBlock];
    if (frame) {
        if (batch) {
            acc_t var_c[kBlock];
            masked_moments<scalar_t, acc_t>(c_next, H, j0, n, B, p.running, t, count, m_c, var_c);
            for (int64_t jj = 0; jj < n; ++jj) {
                r_c[jj] = acc_t(1) / std::sqrt(var_c[jj] + eps);
                if (p.mean_c != nullptr) {
                    ptr<scalar_t>(p.mean_c)[t * H + j0 + jj] = scalar_t(m_c[jj]);
                    ptr<scalar_t>(p.var_c)[t * H + j0 + jj] = scalar_t(var_c[jj]);
                }
            }
        } else {
            for (int64_t jj = 0; jj < n; ++jj) {
                m_c[jj] = acc_t(ptr<scalar_t>(p.pop_mean_c)[t * H + j0 + jj]);
                r_c[jj] = acc_t(1) / std::sqrt(acc_t(ptr<scalar_t>(p.pop_var_c)[t * H + j0 + jj]) + eps);
                if (p.mean_c != nullptr) {
                    ptr<scalar_t>(p.mean_c)[t * H + j0 + jj] = std::numeric_limits<scalar_t>::quiet_NaN();
                    ptr<scalar_t>(p.var_c)[t * H + j0 + jj] = std::numeric_limits<scalar_t>::quiet_NaN();
                }
            }
        }
        for (int64_t jj = 0; jj < n; ++jj) {
            g_c[jj] = acc_t(ptr<scalar_t>(p.gamma_c)[j0 + jj]);
            b_c[jj] = acc_t(ptr<scalar_t>(p.beta_c)[j0 + jj]);
        }
        if (p.save) {
            for (int64_t jj = 0; jj < n; ++jj) ptr<scalar_t>(p.rstd_c)[t * H + j0 + jj] = scalar_t(r_c[jj]);
        }
    } else {
        for (int64_t jj = 0; jj < n; ++jj) {
            m_c[jj] = acc_t(0);
            r_c[jj] = g_c[jj] = acc_t(1);
            b_c[jj] = acc_t(0);
        }
    }
    for (int64_t b = 0; b < B; ++b) {
        if (!p.running(b, t)) continue;
        const scalar_t* go = gates + b * G + 3 * H + j0;
        const scalar_t* cn = c_next + b * H + j0;
        scalar_t* hn = h_next + b * H + j0;
        scalar_t* o = out + b * H + j0;
        scalar_t* xc = xhat_c != nullptr ? xhat_c + b * H + j0 : nullptr;
        scalar_t* tc = tanh_c != nullptr ? tanh_c + b * H + j0 : nullptr;
        for (int64_t jj = 0; jj < n; ++jj) {
            const acc_t x = (acc_t(cn[jj]) - m_c[jj]) * r_c[jj];
            const acc_t y = tanh_of(g_c[jj] * x + b_c[jj]);
            if (xc != nullptr) xc[jj] = scalar_t(x);
            if (tc != nullptr) tc[jj] = scalar_t(y);
            const scalar_t h = scalar_t(acc_t(go[jj]) * y);
            hn[jj] = h;
            o[jj] = h;
        }
    }
}

// Sequence-wise statistics of the input branch over every running (t, b) frame, for gate columns
// [c0, c1): mean and 1 / sqrt(var + eps) into seq_mean, seq_rstd; biased variances into var_ih.
template <typename scalar_t>
void sequence_moments(const ForwardParams& p, int64_t c0, int64_t c1) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t B = p.B, G = 4 * p.H;
    const scalar_t* a = ptr<scalar_t>(p.a_ih);
    acc_t* mean = ptr<acc_t>(p.seq_mean);
    acc_t* rstd = ptr<acc_t>(p.seq_rstd);
    if (!p.seq_batch) {
        for (int64_t c = c0; c < c1; ++c) {
            mean[c] = acc_t(ptr<scalar_t>(p.pop_mean_ih)[c]);
            rstd[c] = acc_t(1) / std::sqrt(acc_t(ptr<scalar_t>(p.pop_var_ih)[c]) + acc_t(p.eps));
        }
        return;
    }
    acc_t frames = 0;
    for (int64_t t = 0; t < p.T; ++t) frames += acc_t(p.counts[t]);
    for (int64_t c0b = c0; c0b < c1; c0b += kBlock) {
        const int64_t n = std::min(kBlock, c1 - c0b);
        acc_t m[kBlock], v[kBlock];
        for (int64_t jj = 0; jj < n; ++jj) m[jj] = v[jj] = acc_t(0);
        for (int64_t t = 0; t < p.T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                if (!p.running(b, t)) continue;
                const scalar_t* row = a + (t * B + b) * G + c0b;
                for (int64_t jj = 0; jj < n; ++jj) m[jj] += acc_t(row[jj]);
            }
        for (int64_t jj = 0; jj < n; ++jj) m[jj] /= frames;
        for (int64_t t = 0; t < p.T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                if (!p.running(b, t)) continue;
                const scalar_t* row = a + (t * B + b) * G + c0b;
                for (int64_t jj = 0; jj < n; ++jj) {
                    const acc_t d = acc_t(row[jj]) - m[jj];
                    v[jj] += d * d;
                }
            }
        for (int64_t jj = 0; jj < n; ++jj) {
            v[jj] /= frames;
            mean[c0b + jj] = m[jj];
            rstd[c0b + jj] = acc_t(1) / std::sqrt(v[jj] + acc_t(p.eps));
            if (p.mean_ih != nullptr) {
                ptr<scalar_t>(p.mean_ih)[c0b + jj] = scalar_t(m[jj]);
                ptr<scalar_t>(p.var_ih)[c0b + jj] = scalar_t(v[jj]);
            }
        }
    }
}

// One step of the backward pass for hidden units [j0, j1) (at most kBlock), every batch row.
template <typename scalar_t>
void backward_block(const BackwardParams& p, int64_t t, int64_t j0, int64_t j1) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t B = p.B, H = p.H, G = 4 * H, n = j1 - j0;
    const bool frame = p.norm == Normalization::kFrame;
    const bool batch = frame && p.step_batch[t];
    const acc_t count = acc_t(p.counts[t]);

    const scalar_t* gates = ptr<scalar_t>(p.gates) + t * B * G;
    const scalar_t* tanh_c = ptr<scalar_t>(p.tanh_c) + t * B * H;
    const scalar_t* xhat_c = frame ? ptr<scalar_t>(p.xhat_c) + t * B * H : nullptr;
    const scalar_t* c_prev = ptr<scalar_t>(p.cs) + t * B * H;
    const scalar_t* gout = p.grad_output != nullptr ? ptr<scalar_t>(p.grad_output) + t * B * H : nullptr;
    const scalar_t* dh = ptr<scalar_t>(p.dh);
    scalar_t* dc = ptr<scalar_t>(p.dc);
    // Free until the GEMM after this pass fills it: holds d(BN(c)) (or d c_t from h) between the passes.
    scalar_t* scratch = ptr<scalar_t>(p.dh_prev);
    scalar_t* da_hh = ptr<scalar_t>(p.da_hh) + t * B * G;

    // h_t = o * tanh(y), y = g_c * xhat_c + beta_c: d o and d y; the BN(c) sums over the running rows.
    acc_t s1[kBlock], s2[kBlock], dgc[kBlock], dbc[kBlock], g_c[kBlock], r_c[kBlock];
    for (int64_t jj = 0; jj < n; ++jj) {
        s1[jj] = s2[jj] = dgc[jj] = dbc[jj] = acc_t(0);
        g_c[jj] = frame ? acc_t(ptr<scalar_t>(p.gamma_c)[j0 + jj]) : acc_t(1);
        r_c[jj] = frame ? acc_t(ptr<scalar_t>(p.rstd_c)[t * H + j0 + jj]) : acc_t(1);
    }
    for (int64_t b = 0; b < B; ++b) {
        if (!p.running(b, t)) continue;
        const scalar_t* go = gates + b * G + 3 * H + j0;
        const scalar_t* tc = tanh_c + b * H + j0;
        const scalar_t* dhb = dh + b * H + j0;
        scalar_t* d_o = da_hh + b * G + 3 * H + j0;
        scalar_t* dy_out = scratch + b * H + j0;
        for (int64_t jj = 0; jj < n; ++jj) {
            const acc_t dh_t = acc_t(dhb[jj]) + (gout != nullptr ? acc_t(gout[b * H + j0 + jj]) : acc_t(0));
            const acc_t o = acc_t(go[jj]), y = acc_t(tc[jj]);
            const acc_t dy = dh_t * o * (acc_t(1) - y * y);
            d_o[jj] = scalar_t(dh_t * y * o * (acc_t(1) - o));
            dy_out[jj] = scalar_t(dy * g_c[jj]);
            if (frame) {
                const acc_t x = acc_t(xhat_c[b * H + j0 + jj]);
                dgc[jj] += dy * x;
                dbc[jj] += dy;
                s1[jj] += dy * g_c[jj];
                s2[jj] += dy * g_c[jj] * x;
            }
        }
    }
    if (frame) {
        acc_t* dgamma_c = ptr<acc_t>(p.dgamma_c);
        acc_t* dbeta_c = ptr<acc_t>(p.dbeta_c);
        for (int64_t jj = 0; jj < n; ++jj) {
            dgamma_c[j0 + jj] += dgc[jj];
            dbeta_c[j0 + jj] += dbc[jj];
            s1[jj] /= count;
            s2[jj] /= count;
        }
    }

    // Through BN(c) and the cell update: d c_t, then d i, d f, d g and d c_{t-1}.
    for (int64_t b = 0; b < B; ++b) {
        if (!p.running(b, t)) {
            for (int k = 0; k < 4; ++k)
                for (int64_t jj = 0; jj < n; ++jj) da_hh[b * G + k * H + j0 + jj] = scalar_t(0);
            continue;
        }
        const scalar_t* gi = gates + b * G + j0;
        const scalar_t* gf = gi + H;
        const scalar_t* gg = gi + 2 * H;
        const scalar_t* cp = c_prev + b * H + j0;
        const scalar_t* dn = scratch + b * H + j0;
        const scalar_t* xc = xhat_c != nullptr ? xhat_c + b * H + j0 : nullptr;
        scalar_t* dcb = dc + b * H + j0;
        scalar_t* d_i = da_hh + b * G + j0;
        for (int64_t jj = 0; jj < n; ++jj) {
            acc_t dbn = acc_t(dn[jj]);
            if (batch) dbn = dbn - s1[jj] - acc_t(xc[jj]) * s2[jj];
            const acc_t dct = acc_t(dcb[jj]) + dbn * r_c[jj];
            const acc_t i = acc_t(gi[jj]), f = acc_t(gf[jj]), g = acc_t(gg[jj]);
            d_i[jj] = scalar_t(dct * g * i * (acc_t(1) - i));
            d_i[H + jj] = scalar_t(dct * acc_t(cp[jj]) * f * (acc_t(1) - f));
            d_i[2 * H + jj] = scalar_t(dct * i * (acc_t(1) - g * g));
            dcb[jj] = scalar_t(dct * f);
        }
    }
    if (!frame) return;

    // Through the two gate-side batch norms: d gamma, d bias, d(W_ih x), d(W_hh h).
    const scalar_t* xhat_ih = ptr<scalar_t>(p.xhat_ih) + t * B * G;
    const scalar_t* xhat_hh = ptr<scalar_t>(p.xhat_hh) + t * B * G;
    scalar_t* da_ih = ptr<scalar_t>(p.da_ih) + t * B * G;
    for (int k = 0; k < 4; ++k) {
        const int64_t col = k * H + j0;
        acc_t sd[kBlock], sdi[kBlock], sdh[kBlock], a_i[kBlock], a_h[kBlock];
        for (int64_t jj = 0; jj < n; ++jj) sd[jj] = sdi[jj] = sdh[jj] = acc_t(0);
        for (int64_t b = 0; b < B; ++b) {
            if (!p.running(b, t)) continue;
            const scalar_t* d = da_hh + b * G + col;
            const scalar_t* xi = xhat_ih + b * G + col;
            const scalar_t* xh = xhat_hh + b * G + col;
            for (int64_t jj = 0; jj < n; ++jj) {
                const acc_t dv = acc_t(d[jj]);
                sd[jj] += dv;
                sdi[jj] += dv * acc_t(xi[jj]);
                sdh[jj] += dv * acc_t(xh[jj]);
            }
        }
        acc_t* dbias = ptr<acc_t>(p.dbias);
        acc_t* dgamma_ih = ptr<acc_t>(p.dgamma_ih);
        acc_t* dgamma_hh = ptr<acc_t>(p.dgamma_hh);
        for (int64_t jj = 0; jj < n; ++jj) {
            if (dbias != nullptr) dbias[col + jj] += sd[jj];
            dgamma_ih[col + jj] += sdi[jj];
            dgamma_hh[col + jj] += sdh[jj];
            a_i[jj] = acc_t(ptr<scalar_t>(p.gamma_ih)[col + jj]) * acc_t(ptr<scalar_t>(p.rstd_ih)[t * G + col + jj]);
            a_h[jj] = acc_t(ptr<scalar_t>(p.gamma_hh)[col + jj]) * acc_t(ptr<scalar_t>(p.rstd_hh)[t * G + col + jj]);
            sd[jj] /= count;
            sdi[jj] /= count;
            sdh[jj] /= count;
        }
        for (int64_t b = 0; b < B; ++b) {
            if (!p.running(b, t)) {
                for (int64_t jj = 0; jj < n; ++jj) da_ih[b * G + col + jj] = scalar_t(0);
                continue;
            }
            scalar_t* d = da_hh + b * G + col;
            scalar_t* di = da_ih + b * G + col;
            const scalar_t* xi = xhat_ih + b * G + col;
            const scalar_t* xh = xhat_hh + b * G + col;
            if (batch) {
                for (int64_t jj = 0; jj < n; ++jj) {
                    const acc_t dv = acc_t(d[jj]);
                    di[jj] = scalar_t(a_i[jj] * (dv - sd[jj] - acc_t(xi[jj]) * sdi[jj]));
                    d[jj] = scalar_t(a_h[jj] * (dv - sd[jj] - acc_t(xh[jj]) * sdh[jj]));
                }
            } else {
                for (int64_t jj = 0; jj < n; ++jj) {
                    const acc_t dv = acc_t(d[jj]);
                    di[jj] = scalar_t(a_i[jj] * dv);
                    d[jj] = scalar_t(a_h[jj] * dv);
                }
            }
        }
    }
}

// Sequence-wise, after the loop: d bias, d gamma_ih and d(W_ih x) from the gate gradients in da_hh, for
// gate columns [c0, c1), over every running frame.
template <typename scalar_t>
void sequence_backward(const BackwardParams& p, int64_t c0, int64_t c1) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t B = p.B, G = 4 * p.H;
    const scalar_t* d = ptr<scalar_t>(p.da_hh);
    const scalar_t* xhat = ptr<scalar_t>(p.xhat_ih);
    scalar_t* da_ih = ptr<scalar_t>(p.da_ih);
    acc_t frames = 0;
    for (int64_t t = 0; t < p.T; ++t) frames += acc_t(p.counts[t]);
    for (int64_t cb = c0; cb < c1; cb += kBlock) {
        const int64_t n = std::min(kBlock, c1 - cb);
        acc_t sd[kBlock], sdx[kBlock], a[kBlock];
        for (int64_t jj = 0; jj < n; ++jj) sd[jj] = sdx[jj] = acc_t(0);
        for (int64_t t = 0; t < p.T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                if (!p.running(b, t)) continue;
                const int64_t row = (t * B + b) * G + cb;
                for (int64_t jj = 0; jj < n; ++jj) {
                    sd[jj] += acc_t(d[row + jj]);
                    sdx[jj] += acc_t(d[row + jj]) * acc_t(xhat[row + jj]);
                }
            }
        for (int64_t jj = 0; jj < n; ++jj) {
            if (p.dbias != nullptr) ptr<acc_t>(p.dbias)[cb + jj] = sd[jj];
            ptr<acc_t>(p.dgamma_ih)[cb + jj] = sdx[jj];
            a[jj] = acc_t(ptr<scalar_t>(p.gamma_ih)[cb + jj]) * acc_t(ptr<scalar_t>(p.seq_rstd)[cb + jj]);
            sd[jj] /= frames;
            sdx[jj] /= frames;
        }
        for (int64_t t = 0; t < p.T; ++t)
            for (int64_t b = 0; b < B; ++b) {
                const int64_t row = (t * B + b) * G + cb;
                if (!p.running(b, t)) {
                    for (int64_t jj = 0; jj < n; ++jj) da_ih[row + jj] = scalar_t(0);
                } else if (p.seq_batch) {
                    for (int64_t jj = 0; jj < n; ++jj)
                        da_ih[row + jj] = scalar_t(a[jj] * (acc_t(d[row + jj]) - sd[jj] - acc_t(xhat[row + jj]) * sdx[jj]));
                } else {
                    for (int64_t jj = 0; jj < n; ++jj) da_ih[row + jj] = scalar_t(a[jj] * acc_t(d[row + jj]));
                }
            }
    }
}

// Split [0, total) into parallel tasks of at least `grain`, each walked in kBlock pieces.
template <typename F>
void for_blocks(int64_t total, int64_t grain, const F& body) {
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; j += kBlock) body(j, std::min(end, j + kBlock));
    });
}

}  // namespace

void forward_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& hs, const at::Tensor& w_hh) {
    const int64_t H = p.H;
    const at::Tensor w_hh_t = w_hh.t();  // [H, 4H]
    const int64_t grain = grain_size(p.B, H);
    AT_DISPATCH_FLOATING_TYPES(a_hh.scalar_type(), "bnlstm_forward_cpu", [&] {
        if (p.norm == Normalization::kSequence) {
            for_blocks(4 * H, std::max<int64_t>(kBlock, grain),
                       [&](int64_t c0, int64_t c1) { sequence_moments<scalar_t>(p, c0, c1); });
        }
        for (int64_t t = 0; t < p.T; ++t) {
            const int64_t prev = p.save ? t : (t & 1);
            at::mm_out(a_hh, hs.select(0, prev), w_hh_t);
            for_blocks(H, grain, [&](int64_t j0, int64_t j1) { forward_block<scalar_t>(p, t, j0, j1); });
        }
    });
}

void backward_cpu(BackwardParams& p, at::Tensor& dh, at::Tensor& dh_prev, const at::Tensor& da_hh,
                  const at::Tensor& w_hh) {
    const int64_t B = p.B, H = p.H;
    const int64_t grain = grain_size(B, H);
    AT_DISPATCH_FLOATING_TYPES(da_hh.scalar_type(), "bnlstm_backward_cpu", [&] {
        for (int64_t t = p.T - 1; t >= 0; --t) {
            p.dh = dh.data_ptr();
            p.dh_prev = dh_prev.data_ptr();
            for_blocks(H, grain, [&](int64_t j0, int64_t j1) { backward_block<scalar_t>(p, t, j0, j1); });
            // dh_{t-1} = d(W_hh h_{t-1}) W_hh; rows already finished pass their gradient through.
            at::mm_out(dh_prev, da_hh.select(0, t), w_hh);
            if (p.running.lengths != nullptr) {
                scalar_t* out = dh_prev.data_ptr<scalar_t>();
                const scalar_t* in = dh.data_ptr<scalar_t>();
                for (int64_t b = 0; b < B; ++b) {
                    if (p.running(b, t)) continue;
                    for (int64_t j = 0; j < H; ++j) out[b * H + j] += in[b * H + j];
                }
            }
            std::swap(dh, dh_prev);
        }
        if (p.norm == Normalization::kSequence) {
            for_blocks(4 * H, std::max<int64_t>(kBlock, grain),
                       [&](int64_t c0, int64_t c1) { sequence_backward<scalar_t>(p, c0, c1); });
        }
    });
}

}  // namespace fused_bnlstm
