// The BN-LSTM step kernels on the CPU: one step of the forward or backward pass for a block of hidden units
// and every batch row, and the sequence-wise statistics passes. Plain C++ loops without branches inside, so
// that the compiler vectorizes them; no ATen. This file is included inside a namespace by each
// bnlstm_kernels*.cpp, which compiles it for one instruction set (default, AVX2, AVX-512); the driver in
// bnlstm_cpu.cpp picks the widest the CPU has. Buffer shapes: bnlstm.h. Derivation: README.md.
//
// Includes first, in the including file: <algorithm>, <cmath>, <cstdint>, <cstring>, <limits>, "bnlstm.h".

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

// Per-column normalization of one gate block: pre = g_hh * (a_hh - m_hh) * r_hh + g_ih * (a_ih - m_ih) * r_ih + b.
template <typename acc_t>
struct GateColumns {
    const acc_t *m_ih, *r_ih, *g_ih, *m_hh, *r_hh, *g_hh, *bias;
};

// One row's gate pre-activations for n columns. The flags are compile-time so that the loop has no branch
// and vectorizes: keep xhat_ih (written over a_ih), keep xhat_hh, write the result over a_ih (None).
template <typename scalar_t, typename acc_t, bool STORE_XI, bool STORE_XH, bool IN_PLACE>
inline void gate_preactivations(scalar_t* xi, const scalar_t* __restrict ah, scalar_t* __restrict xh,
                                scalar_t* g, const GateColumns<acc_t>& c, int64_t n) {
    for (int64_t jj = 0; jj < n; ++jj) {
        const acc_t ni = (acc_t(xi[jj]) - c.m_ih[jj]) * c.r_ih[jj];
        const acc_t nh = (acc_t(ah[jj]) - c.m_hh[jj]) * c.r_hh[jj];
        const acc_t pre = c.g_hh[jj] * nh + c.g_ih[jj] * ni + c.bias[jj];
        if constexpr (STORE_XI) xi[jj] = scalar_t(ni);
        if constexpr (STORE_XH) xh[jj] = scalar_t(nh);
        if constexpr (IN_PLACE) {
            xi[jj] = scalar_t(pre);
        } else {
            g[jj] = scalar_t(pre);
        }
    }
}

// One row's h = o * tanh(g_c * (c - m_c) * r_c + beta_c) for n columns, optionally keeping xhat_c and the tanh.
template <typename scalar_t, typename acc_t, bool STORE_XC, bool STORE_TC>
inline void hidden_output(const scalar_t* __restrict go, const scalar_t* __restrict cn, const acc_t* __restrict m_c,
                          const acc_t* __restrict r_c, const acc_t* __restrict g_c, const acc_t* __restrict b_c,
                          scalar_t* __restrict xc, scalar_t* __restrict tc, scalar_t* __restrict hn,
                          scalar_t* __restrict out, int64_t n) {
    for (int64_t jj = 0; jj < n; ++jj) {
        const acc_t x = (acc_t(cn[jj]) - m_c[jj]) * r_c[jj];
        const acc_t y = tanh_of(g_c[jj] * x + b_c[jj]);
        if constexpr (STORE_XC) xc[jj] = scalar_t(x);
        if constexpr (STORE_TC) tc[jj] = scalar_t(y);
        const scalar_t h = scalar_t(acc_t(go[jj]) * y);
        hn[jj] = h;
        out[jj] = h;
    }
}

// One step of the forward pass for hidden units [j0, j1) (at most kBlock), every batch row.
template <typename scalar_t>
void forward_block(const ForwardParams& p, int64_t t, int64_t j0, int64_t j1) {
    using acc_t = scalar_t;  // float and double accumulate in their own type
    const int64_t B = p.B, H = p.H, G = 4 * H, n = j1 - j0;
    const bool frame = p.norm == Normalization::kFrame;
    const bool sequence = p.norm == Normalization::kSequence;
    const bool batch = frame && p.step_batch[t];
    const acc_t count = acc_t(p.counts[t]);
    const acc_t eps = acc_t(p.eps);

    scalar_t* a_ih = ptr<scalar_t>(p.a_ih) + t * p.a_ih_step;  // [B, 4H], becomes xhat_ih or the activations
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
            const GateColumns<acc_t> cols{m_ih[k], r_ih[k], g_ih[k], m_hh[k], r_hh[k], g_hh[k], b_g[k]};
            if (p.norm == Normalization::kNone) {
                gate_preactivations<scalar_t, acc_t, false, false, true>(xi, ah, nullptr, xi, cols, n);
            } else if (xh != nullptr) {
                gate_preactivations<scalar_t, acc_t, true, true, false>(xi, ah, xh, g, cols, n);
            } else if (keep_xhat_ih) {
                gate_preactivations<scalar_t, acc_t, true, false, false>(xi, ah, nullptr, g, cols, n);
            } else {
                gate_preactivations<scalar_t, acc_t, false, false, false>(xi, ah, nullptr, g, cols, n);
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
        if (xc != nullptr) {
            hidden_output<scalar_t, acc_t, true, true>(go, cn, m_c, r_c, g_c, b_c, xc, tc, hn, o, n);
        } else if (tc != nullptr) {
            hidden_output<scalar_t, acc_t, false, true>(go, cn, m_c, r_c, g_c, b_c, nullptr, tc, hn, o, n);
        } else {
            hidden_output<scalar_t, acc_t, false, false>(go, cn, m_c, r_c, g_c, b_c, nullptr, nullptr, hn, o, n);
        }
    }
}

// Sequence-wise statistics of the input branch over every running (t, b) frame, for gate columns
// [c0, c1): mean and 1 / sqrt(var + eps) into seq_mean, seq_rstd; biased variances into var_ih.
template <typename scalar_t>
void sequence_moments(const ForwardParams& p, int64_t c0, int64_t c1) {
    using acc_t = scalar_t;  // float and double accumulate in their own type
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

// Column sums of the BN(c) backward, accumulated over rows: sum dn, sum dn * xhat_c, d gamma_c, d beta_c.
template <typename acc_t>
struct OutputGradSums {
    acc_t *s1, *s2, *dgamma_c, *dbeta_c;
};

// One row, n columns, of h = o * tanh(y): d o (into d_o) and dn = d y * gamma_c (into dn_out), with the
// frame-wise column sums; the flags are compile-time so that the loop vectorizes.
template <typename scalar_t, typename acc_t, bool FRAME, bool HAS_GOUT>
inline void output_grad(const scalar_t* __restrict dh, const scalar_t* __restrict gout,
                        const scalar_t* __restrict go, const scalar_t* __restrict tc,
                        const scalar_t* __restrict xc, const acc_t* __restrict g_c, scalar_t* __restrict d_o,
                        scalar_t* __restrict dn_out, const OutputGradSums<acc_t>& sums, int64_t n) {
    for (int64_t jj = 0; jj < n; ++jj) {
        acc_t dh_t = acc_t(dh[jj]);
        if constexpr (HAS_GOUT) dh_t += acc_t(gout[jj]);
        const acc_t o = acc_t(go[jj]), y = acc_t(tc[jj]);
        const acc_t dy = dh_t * o * (acc_t(1) - y * y);
        d_o[jj] = scalar_t(dh_t * y * o * (acc_t(1) - o));
        const acc_t dn = dy * g_c[jj];
        dn_out[jj] = scalar_t(dn);
        if constexpr (FRAME) {
            const acc_t x = acc_t(xc[jj]);
            sums.dgamma_c[jj] += dy * x;
            sums.dbeta_c[jj] += dy;
            sums.s1[jj] += dn;
            sums.s2[jj] += dn * x;
        }
    }
}

// Means of the BN(c) backward (s1, s2 already divided by the count) and 1 / sqrt(var + eps) of c.
template <typename acc_t>
struct CellGradColumns {
    const acc_t *s1, *s2, *r_c;
};

// One row, n columns, through BN(c) and the cell update: d i, d f, d g (into d_i, d_i + H, d_i + 2H) and
// d c_{t-1} (over dc, which holds d c_t from the later step on entry).
template <typename scalar_t, typename acc_t, bool BATCH>
inline void cell_grad(const scalar_t* __restrict dn, const scalar_t* __restrict xc, const scalar_t* __restrict gi,
                      const scalar_t* __restrict cp, const CellGradColumns<acc_t>& c, scalar_t* __restrict dc,
                      scalar_t* __restrict d_i, int64_t H, int64_t n) {
    const scalar_t* __restrict gf = gi + H;
    const scalar_t* __restrict gg = gi + 2 * H;
    scalar_t* __restrict d_f = d_i + H;
    scalar_t* __restrict d_g = d_i + 2 * H;
    for (int64_t jj = 0; jj < n; ++jj) {
        acc_t dbn = acc_t(dn[jj]);
        if constexpr (BATCH) dbn = dbn - c.s1[jj] - acc_t(xc[jj]) * c.s2[jj];
        const acc_t dct = acc_t(dc[jj]) + dbn * c.r_c[jj];
        const acc_t i = acc_t(gi[jj]), f = acc_t(gf[jj]), g = acc_t(gg[jj]);
        d_i[jj] = scalar_t(dct * g * i * (acc_t(1) - i));
        d_f[jj] = scalar_t(dct * acc_t(cp[jj]) * f * (acc_t(1) - f));
        d_g[jj] = scalar_t(dct * i * (acc_t(1) - g * g));
        dc[jj] = scalar_t(dct * f);
    }
}

// One step of the backward pass for hidden units [j0, j1) (at most kBlock), every batch row.
template <typename scalar_t>
void backward_block(const BackwardParams& p, int64_t t, int64_t j0, int64_t j1) {
    using acc_t = scalar_t;  // float and double accumulate in their own type
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
        const scalar_t* gob = gout != nullptr ? gout + b * H + j0 : nullptr;
        const scalar_t* xc = frame ? xhat_c + b * H + j0 : nullptr;
        const OutputGradSums<acc_t> sums{s1, s2, dgc, dbc};
        if (frame && gob != nullptr) {
            output_grad<scalar_t, acc_t, true, true>(dhb, gob, go, tc, xc, g_c, d_o, dy_out, sums, n);
        } else if (frame) {
            output_grad<scalar_t, acc_t, true, false>(dhb, nullptr, go, tc, xc, g_c, d_o, dy_out, sums, n);
        } else if (gob != nullptr) {
            output_grad<scalar_t, acc_t, false, true>(dhb, gob, go, tc, nullptr, g_c, d_o, dy_out, sums, n);
        } else {
            output_grad<scalar_t, acc_t, false, false>(dhb, nullptr, go, tc, nullptr, g_c, d_o, dy_out, sums, n);
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
        const scalar_t* cp = c_prev + b * H + j0;
        const scalar_t* dn = scratch + b * H + j0;
        const scalar_t* xc = xhat_c != nullptr ? xhat_c + b * H + j0 : nullptr;
        scalar_t* dcb = dc + b * H + j0;
        scalar_t* d_i = da_hh + b * G + j0;
        const CellGradColumns<acc_t> cols{s1, s2, r_c};
        if (batch) {
            cell_grad<scalar_t, acc_t, true>(dn, xc, gi, cp, cols, dcb, d_i, H, n);
        } else {
            cell_grad<scalar_t, acc_t, false>(dn, nullptr, gi, cp, cols, dcb, d_i, H, n);
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
    using acc_t = scalar_t;  // float and double accumulate in their own type
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

const StepKernels kTable = {
    &forward_block<float>,     &forward_block<double>,     &backward_block<float>,
    &backward_block<double>,   &sequence_moments<float>,   &sequence_moments<double>,
    &sequence_backward<float>, &sequence_backward<double>, ISA_NAME,
};
