// fused_bnlstm._C: input checks, buffer allocation and dispatch for the fused BN-LSTM layer, and the
// Python bindings. The kernels are in bnlstm_cpu.cpp; every buffer's shape is documented in bnlstm.h.

#include <torch/extension.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "bnlstm.h"
#include "workspace.h"

namespace fused_bnlstm {

void forward_cpu(ForwardParams& p, at::Tensor& a_hh, const at::Tensor& hs, const at::Tensor& w_hh);
void backward_cpu(BackwardParams& p, at::Tensor& dh, at::Tensor& dh_prev, const at::Tensor& da_hh,
                  const at::Tensor& w_hh);
const char* kernel_isa();
bool use_brgemm();
at::Tensor gemm_nn(const at::Tensor& a, const at::Tensor& b);
at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b);
void gemm_nn_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b);
bool step_on_one_thread(int64_t B, int64_t H, int64_t I);

namespace {

using OptTensor = std::optional<at::Tensor>;

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mutable_ptr_or_null(at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A checked, contiguous copy (or the tensor itself) of an optional argument; undefined when absent.
at::Tensor checked(const OptTensor& value, const char* name, const at::Tensor& like, at::IntArrayRef shape) {
    if (!value.has_value() || !value->defined()) return at::Tensor();
    const at::Tensor& v = *value;
    TORCH_CHECK(v.device().is_cpu(), "bnlstm: ", name, " must be a CPU tensor, got ", v.device());
    TORCH_CHECK(v.scalar_type() == like.scalar_type(), "bnlstm: ", name, " has dtype ", v.scalar_type(),
                ", expected ", like.scalar_type(), " (the dtype of x)");
    TORCH_CHECK(v.sizes() == shape, "bnlstm: ", name, " has shape ", v.sizes(), ", expected ", shape);
    return v.contiguous();
}

at::Tensor required(const OptTensor& value, const char* name, const at::Tensor& like, at::IntArrayRef shape,
                    const char* why) {
    at::Tensor v = checked(value, name, like, shape);
    TORCH_CHECK(v.defined(), "bnlstm: ", name, " is required ", why);
    return v;
}

Normalization to_normalization(int64_t mode) {
    TORCH_CHECK(mode >= 0 && mode <= 2, "bnlstm: normalization code must be 0 (None), 1 (frame) or 2 "
                "(sequence), got ", mode);
    return static_cast<Normalization>(mode);
}

// Rows running at each step ([T] int64) and the lengths as a contiguous int64 tensor (or undefined).
std::pair<at::Tensor, at::Tensor> step_counts(const OptTensor& lengths, int64_t T, int64_t B) {
    at::Tensor len;
    at::Tensor counts = at::full({T}, B, at::kLong);
    if (lengths.has_value() && lengths->defined()) {
        TORCH_CHECK(lengths->device().is_cpu() && lengths->scalar_type() == at::kLong && lengths->dim() == 1 &&
                        lengths->size(0) == B,
                    "bnlstm: lengths must be a [B] int64 CPU tensor, got ", lengths->scalar_type(), " ",
                    lengths->sizes(), " on ", lengths->device());
        len = lengths->contiguous();
        const int64_t* l = len.data_ptr<int64_t>();
        int64_t* c = counts.data_ptr<int64_t>();
        for (int64_t t = 0; t < T; ++t) {
            int64_t n = 0;
            for (int64_t b = 0; b < B; ++b) n += l[b] > t;
            c[t] = n;
        }
    }
    return {len, counts};
}

at::Tensor step_batch_flags(const at::Tensor& counts, bool frame, bool use_batch_stats) {
    at::Tensor flags = at::zeros({counts.size(0)}, at::kByte);
    if (frame && use_batch_stats) flags.copy_(counts.ge(2));
    return flags;
}

void check_main(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh) {
    TORCH_CHECK(x.device().is_cpu(), "bnlstm (cpp backend): expected CPU tensors, got x on ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "bnlstm (cpp backend): expected float32 or float64 tensors, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 3, "bnlstm: x must be [T, B, I], got ", x.sizes());
    TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * w_hh.size(1),
                "bnlstm: weight_hh must be [4H, H], got ", w_hh.sizes());
    TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == w_hh.size(0) && w_ih.size(1) == x.size(2),
                "bnlstm: weight_ih must be [4H, I] = [", w_hh.size(0), ", ", x.size(2), "], got ", w_ih.sizes());
    for (const at::Tensor* w : {&w_ih, &w_hh}) {
        TORCH_CHECK(w->device().is_cpu() && w->scalar_type() == x.scalar_type(),
                    "bnlstm: weights must be CPU tensors of x's dtype ", x.scalar_type());
    }
}

}  // namespace

// Returns [output, h_n, c_n, counts, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c,
//          hs, cs, gates, xhat_ih, xhat_hh, xhat_c, tanh_c, rstd_ih, rstd_hh, rstd_c, seq_rstd];
// statistics are undefined (None) where not returned, saved buffers where not kept.
std::vector<at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in,
                                const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const OptTensor& bias_in,
                                const OptTensor& gamma_ih_in, const OptTensor& gamma_hh_in,
                                const OptTensor& gamma_c_in, const OptTensor& beta_c_in, const OptTensor& lengths_in,
                                const OptTensor& pop_mean_ih_in, const OptTensor& pop_var_ih_in,
                                const OptTensor& pop_mean_hh_in, const OptTensor& pop_var_hh_in,
                                const OptTensor& pop_mean_c_in, const OptTensor& pop_var_c_in, bool use_batch_stats,
                                double eps, int64_t normalization, bool save) {
    check_main(x_in, w_ih_in, w_hh_in);
    const Normalization norm = to_normalization(normalization);
    const bool frame = norm == Normalization::kFrame, sequence = norm == Normalization::kSequence;
    const at::Tensor x = x_in.contiguous();
    const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
    const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = 4 * H;
    const at::Tensor h0 = required(h0_in, "h0", x, {B, H}, "");
    const at::Tensor c0 = required(c0_in, "c0", x, {B, H}, "");
    const at::Tensor bias = checked(bias_in, "bias", x, {G});
    at::Tensor gamma_ih, gamma_hh, gamma_c, beta_c;
    if (frame || sequence) gamma_ih = required(gamma_ih_in, "gamma_ih", x, {G}, "when normalizing");
    if (frame) {
        gamma_hh = required(gamma_hh_in, "gamma_hh", x, {G}, "for frame-wise normalization");
        gamma_c = required(gamma_c_in, "gamma_c", x, {H}, "for frame-wise normalization");
        beta_c = required(beta_c_in, "beta_c", x, {H}, "for frame-wise normalization");
    }
    auto [lengths, counts] = step_counts(lengths_in, T, B);
    const at::Tensor step_batch = step_batch_flags(counts, frame, use_batch_stats);
    const int64_t frames = counts.sum().item<int64_t>();
    const bool seq_batch = sequence && use_batch_stats && frames >= 2;

    // Population statistics, where some step reads them.
    at::Tensor pop_mean_ih, pop_var_ih, pop_mean_hh, pop_var_hh, pop_mean_c, pop_var_c;
    const bool frame_needs_pop = frame && (!use_batch_stats || counts.lt(2).any().item<bool>());
    if (frame_needs_pop) {
        const char* why = "(population statistics) for steps normalized without batch statistics";
        pop_mean_ih = required(pop_mean_ih_in, "population.mean_ih", x, {T, G}, why);
        pop_var_ih = required(pop_var_ih_in, "population.var_ih", x, {T, G}, why);
        pop_mean_hh = required(pop_mean_hh_in, "population.mean_hh", x, {T, G}, why);
        pop_var_hh = required(pop_var_hh_in, "population.var_hh", x, {T, G}, why);
        pop_mean_c = required(pop_mean_c_in, "population.mean_c", x, {T, H}, why);
        pop_var_c = required(pop_var_c_in, "population.var_c", x, {T, H}, why);
    }
    if (sequence && !seq_batch) {
        const char* why = "(population statistics) when not normalizing with batch statistics";
        pop_mean_ih = required(pop_mean_ih_in, "population.mean_ih", x, {1, G}, why);
        pop_var_ih = required(pop_var_ih_in, "population.var_ih", x, {1, G}, why);
    }

    const auto opts = x.options();
    // The input branch W_ih x. Either one GEMM over all steps, or (float32 with brgemm) inside the step's
    // pass next to the recurrent GEMM, where it stays in cache instead of a [T, B, 4H] round trip through
    // memory: faster for a small input (I <= 16: the big GEMM has almost no work per byte) or when the step
    // runs on one thread; with the step split over threads the big GEMM scaled better (README.md).
    // Sequence-wise needs its statistics over every frame before the loop: always the one GEMM.
    const bool input_per_step = x.scalar_type() == at::kFloat && !sequence && use_brgemm() &&
                                (I <= 16 || step_on_one_thread(B, H, I));
    at::Tensor a_ih = empty_workspace({(input_per_step && !save) ? 1 : T, B, G}, opts);
    const at::Tensor w_ih_t = w_ih.t().contiguous();  // [I, 4H]
    if (!input_per_step) {
        at::Tensor a_ih_rows = a_ih.view({T * B, G});
        gemm_nn_out(a_ih_rows, x.view({T * B, I}), w_ih_t);
    }
    at::Tensor a_hh = at::empty({B, G}, opts);
    at::Tensor hs = empty_workspace({save ? T + 1 : 2, B, H}, opts);
    at::Tensor cs = empty_workspace({save ? T + 1 : 2, B, H}, opts);
    hs.select(0, 0).copy_(h0);
    cs.select(0, 0).copy_(c0);
    at::Tensor output = empty_workspace({T, B, H}, opts);
    at::Tensor gates, xhat_hh, xhat_c, tanh_c, rstd_ih, rstd_hh, rstd_c, seq_mean, seq_rstd;
    if (norm != Normalization::kNone) gates = empty_workspace({save ? T : 1, B, G}, opts);
    if (save) tanh_c = empty_workspace({T, B, H}, opts);
    if (frame && save) {
        xhat_hh = empty_workspace({T, B, G}, opts);
        xhat_c = empty_workspace({T, B, H}, opts);
        rstd_ih = empty_workspace({T, G}, opts);
        rstd_hh = empty_workspace({T, G}, opts);
        rstd_c = empty_workspace({T, H}, opts);
    }
    if (sequence) {
        seq_mean = at::empty({G}, opts);
        seq_rstd = at::empty({G}, opts);
    }
    at::Tensor mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c;
    if (frame && use_batch_stats) {
        mean_ih = empty_workspace({T, G}, opts);
        var_ih = empty_workspace({T, G}, opts);
        mean_hh = empty_workspace({T, G}, opts);
        var_hh = empty_workspace({T, G}, opts);
        mean_c = empty_workspace({T, H}, opts);
        var_c = empty_workspace({T, H}, opts);
    } else if (seq_batch) {
        mean_ih = empty_workspace({1, G}, opts);
        var_ih = empty_workspace({1, G}, opts);
    }

    ForwardParams p{};
    p.T = T;
    p.B = B;
    p.I = I;
    p.H = H;
    p.norm = norm;
    p.eps = eps;
    p.save = save;
    p.running = RowMask{lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
    p.counts = counts.data_ptr<int64_t>();
    p.step_batch = step_batch.data_ptr<uint8_t>();
    p.seq_batch = seq_batch;
    p.bias = ptr_or_null(bias);
    p.gamma_ih = ptr_or_null(gamma_ih);
    p.gamma_hh = ptr_or_null(gamma_hh);
    p.gamma_c = ptr_or_null(gamma_c);
    p.beta_c = ptr_or_null(beta_c);
    p.pop_mean_ih = ptr_or_null(pop_mean_ih);
    p.pop_var_ih = ptr_or_null(pop_var_ih);
    p.pop_mean_hh = ptr_or_null(pop_mean_hh);
    p.pop_var_hh = ptr_or_null(pop_var_hh);
    p.pop_mean_c = ptr_or_null(pop_mean_c);
    p.pop_var_c = ptr_or_null(pop_var_c);
    p.a_ih = a_ih.data_ptr();
    p.a_ih_step = (input_per_step && !save) ? 0 : B * G;
    p.input_per_step = input_per_step;
    p.x = x.data_ptr();
    p.w_ih_t = ptr_or_null(w_ih_t);
    p.a_hh = a_hh.data_ptr();
    p.gates = mutable_ptr_or_null(gates);
    p.xhat_hh = mutable_ptr_or_null(xhat_hh);
    p.xhat_c = mutable_ptr_or_null(xhat_c);
    p.tanh_c = mutable_ptr_or_null(tanh_c);
    p.rstd_ih = mutable_ptr_or_null(rstd_ih);
    p.rstd_hh = mutable_ptr_or_null(rstd_hh);
    p.rstd_c = mutable_ptr_or_null(rstd_c);
    p.seq_mean = mutable_ptr_or_null(seq_mean);
    p.seq_rstd = mutable_ptr_or_null(seq_rstd);
    p.mean_ih = mutable_ptr_or_null(mean_ih);
    p.var_ih = mutable_ptr_or_null(var_ih);
    p.mean_hh = mutable_ptr_or_null(mean_hh);
    p.var_hh = mutable_ptr_or_null(var_hh);
    p.mean_c = mutable_ptr_or_null(mean_c);
    p.var_c = mutable_ptr_or_null(var_c);
    p.hs = hs.data_ptr();
    p.cs = cs.data_ptr();
    p.output = output.data_ptr();
    if (B > 0 && H > 0) forward_cpu(p, a_hh, hs, w_hh);

    const int64_t last = save ? T : (T & 1);
    at::Tensor h_n = hs.select(0, last).clone();
    at::Tensor c_n = cs.select(0, last).clone();
    if (sequence) counts = at::full({1}, frames, at::kLong);
    if (!save) return {output, h_n, c_n, counts, mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c};
    // For None the gate activations were written over the input branch; otherwise it holds xhat_ih.
    at::Tensor xhat_ih;
    if (norm == Normalization::kNone) gates = a_ih;
    else xhat_ih = a_ih;
    return {output, h_n,   c_n,   counts,  mean_ih, var_ih,  mean_hh, var_hh, mean_c,   var_c, hs,
            cs,     gates, xhat_ih, xhat_hh, xhat_c,  tanh_c,  rstd_ih, rstd_hh, rstd_c, seq_rstd};
}

// Returns [dx, dh0, dc0, dW_ih, dW_hh, dbias, dgamma_ih, dgamma_hh, dgamma_c, dbeta_c]; undefined (None)
// where the parameter is absent or the gradient was not asked for.
std::vector<at::Tensor> backward(const OptTensor& grad_output_in, const OptTensor& grad_hn_in,
                                 const OptTensor& grad_cn_in, const at::Tensor& x_in, const at::Tensor& w_ih_in,
                                 const at::Tensor& w_hh_in, const OptTensor& gamma_ih_in,
                                 const OptTensor& gamma_hh_in, const OptTensor& gamma_c_in, bool has_bias,
                                 const OptTensor& lengths_in, const at::Tensor& hs, const at::Tensor& cs,
                                 const at::Tensor& gates, const OptTensor& xhat_ih_in, const OptTensor& xhat_hh_in,
                                 const OptTensor& xhat_c_in, const at::Tensor& tanh_c, const OptTensor& rstd_ih_in,
                                 const OptTensor& rstd_hh_in, const OptTensor& rstd_c_in,
                                 const OptTensor& seq_rstd_in, bool use_batch_stats, int64_t normalization,
                                 bool need_dx) {
    check_main(x_in, w_ih_in, w_hh_in);
    const Normalization norm = to_normalization(normalization);
    const bool frame = norm == Normalization::kFrame, sequence = norm == Normalization::kSequence;
    const at::Tensor x = x_in.contiguous();
    const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
    const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = 4 * H;
    const auto opts = x.options();
    // An expanded cotangent (from out.sum()) is read as a contiguous one: copied into a cached buffer.
    at::Tensor grad_output;
    if (grad_output_in.has_value() && grad_output_in->defined()) {
        const at::Tensor& g = *grad_output_in;
        TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == x.scalar_type() && g.sizes() == at::IntArrayRef({T, B, H}),
                    "bnlstm: grad_output must be a CPU ", x.scalar_type(), " tensor of shape [", T, ", ", B, ", ", H,
                    "], got ", g.scalar_type(), " ", g.sizes());
        grad_output = g.is_contiguous() ? g : workspace_copy(g);
    }
    at::Tensor gamma_ih, gamma_hh, gamma_c;
    if (frame || sequence) gamma_ih = required(gamma_ih_in, "gamma_ih", x, {G}, "when normalizing");
    if (frame) {
        gamma_hh = required(gamma_hh_in, "gamma_hh", x, {G}, "for frame-wise normalization");
        gamma_c = required(gamma_c_in, "gamma_c", x, {H}, "for frame-wise normalization");
    }
    auto [lengths, counts] = step_counts(lengths_in, T, B);
    const at::Tensor step_batch = step_batch_flags(counts, frame, use_batch_stats);
    const bool seq_batch = sequence && use_batch_stats && counts.sum().item<int64_t>() >= 2;
    const char* saved = "(saved by forward)";
    at::Tensor xhat_ih, xhat_hh, xhat_c, rstd_ih, rstd_hh, rstd_c, seq_rstd;
    if (frame || sequence) xhat_ih = required(xhat_ih_in, "xhat_ih", x, {T, B, G}, saved);
    if (frame) {
        xhat_hh = required(xhat_hh_in, "xhat_hh", x, {T, B, G}, saved);
        xhat_c = required(xhat_c_in, "xhat_c", x, {T, B, H}, saved);
        rstd_ih = required(rstd_ih_in, "rstd_ih", x, {T, G}, saved);
        rstd_hh = required(rstd_hh_in, "rstd_hh", x, {T, G}, saved);
        rstd_c = required(rstd_c_in, "rstd_c", x, {T, H}, saved);
    }
    if (sequence) seq_rstd = required(seq_rstd_in, "seq_rstd", x, {G}, saved);
    TORCH_CHECK(hs.sizes() == at::IntArrayRef({T + 1, B, H}) && cs.sizes() == hs.sizes() &&
                    gates.sizes() == at::IntArrayRef({T, B, G}) && tanh_c.sizes() == at::IntArrayRef({T, B, H}),
                "bnlstm: saved states do not match x's shape");

    at::Tensor dh = grad_hn_in.has_value() && grad_hn_in->defined()
                        ? checked(grad_hn_in, "grad_h_n", x, {B, H}).clone()
                        : at::zeros({B, H}, opts);
    at::Tensor dc = grad_cn_in.has_value() && grad_cn_in->defined()
                        ? checked(grad_cn_in, "grad_c_n", x, {B, H}).clone()
                        : at::zeros({B, H}, opts);
    at::Tensor dh_prev = at::empty({B, H}, opts);
    at::Tensor da_hh = empty_workspace({T, B, G}, opts);
    at::Tensor da_ih = norm == Normalization::kNone ? da_hh : empty_workspace({T, B, G}, opts);
    const auto acc_opts = opts;  // float32 and float64 accumulate in their own type (opmath)
    at::Tensor dbias = (has_bias && norm != Normalization::kNone) ? at::zeros({G}, acc_opts) : at::Tensor();
    at::Tensor dgamma_ih = (frame || sequence) ? at::zeros({G}, acc_opts) : at::Tensor();
    at::Tensor dgamma_hh = frame ? at::zeros({G}, acc_opts) : at::Tensor();
    at::Tensor dgamma_c = frame ? at::zeros({H}, acc_opts) : at::Tensor();
    at::Tensor dbeta_c = frame ? at::zeros({H}, acc_opts) : at::Tensor();

    BackwardParams p{};
    p.T = T;
    p.B = B;
    p.I = I;
    p.H = H;
    p.norm = norm;
    p.running = RowMask{lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
    p.counts = counts.data_ptr<int64_t>();
    p.step_batch = step_batch.data_ptr<uint8_t>();
    p.seq_batch = seq_batch;
    p.gamma_ih = ptr_or_null(gamma_ih);
    p.gamma_hh = ptr_or_null(gamma_hh);
    p.gamma_c = ptr_or_null(gamma_c);
    const at::Tensor hs_c = hs.contiguous(), cs_c = cs.contiguous(), gates_c = gates.contiguous(),
                     tanh_c_c = tanh_c.contiguous();
    p.hs = hs_c.data_ptr();
    p.cs = cs_c.data_ptr();
    p.gates = gates_c.data_ptr();
    p.xhat_ih = ptr_or_null(xhat_ih);
    p.xhat_hh = ptr_or_null(xhat_hh);
    p.xhat_c = ptr_or_null(xhat_c);
    p.tanh_c = tanh_c_c.data_ptr();
    p.rstd_ih = ptr_or_null(rstd_ih);
    p.rstd_hh = ptr_or_null(rstd_hh);
    p.rstd_c = ptr_or_null(rstd_c);
    p.seq_rstd = ptr_or_null(seq_rstd);
    p.grad_output = ptr_or_null(grad_output);
    p.dc = dc.data_ptr();
    p.da_hh = da_hh.data_ptr();
    p.da_ih = da_ih.data_ptr();
    p.dbias = mutable_ptr_or_null(dbias);
    p.dgamma_ih = mutable_ptr_or_null(dgamma_ih);
    p.dgamma_hh = mutable_ptr_or_null(dgamma_hh);
    p.dgamma_c = mutable_ptr_or_null(dgamma_c);
    p.dbeta_c = mutable_ptr_or_null(dbeta_c);
    if (B > 0 && H > 0) {
        backward_cpu(p, dh, dh_prev, da_hh, w_hh);
    } else {
        da_hh.zero_();
        da_ih.zero_();
    }

    // Weight gradients: one GEMM each over all T * B rows.
    const at::Tensor da_ih_rows = da_ih.view({T * B, G});
    const at::Tensor da_hh_rows = da_hh.view({T * B, G});
    at::Tensor dw_ih = gemm_tn(da_ih_rows, x.view({T * B, I}));
    at::Tensor dw_hh = gemm_tn(da_hh_rows, hs_c.narrow(0, 0, T).view({T * B, H}));
    at::Tensor dx = need_dx ? gemm_nn(da_ih_rows, w_ih).view({T, B, I}) : at::Tensor();
    if (has_bias && norm == Normalization::kNone) dbias = da_hh_rows.sum(0);
    return {dx, dh, dc, dw_ih, dw_hh, dbias, dgamma_ih, dgamma_hh, dgamma_c, dbeta_c};
}

}  // namespace fused_bnlstm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fused_bnlstm compiled extension: a fused CPU forward and backward of one BN-LSTM layer";
    m.def("bnlstm_forward_cpu", &fused_bnlstm::forward, "BN-LSTM layer forward on the CPU (see csrc/bnlstm.h)",
          py::arg("x"), py::arg("h0"), py::arg("c0"), py::arg("weight_ih"), py::arg("weight_hh"), py::arg("bias"),
          py::arg("gamma_ih"), py::arg("gamma_hh"), py::arg("gamma_c"), py::arg("beta_c"), py::arg("lengths"),
          py::arg("pop_mean_ih"), py::arg("pop_var_ih"), py::arg("pop_mean_hh"), py::arg("pop_var_hh"),
          py::arg("pop_mean_c"), py::arg("pop_var_c"), py::arg("use_batch_stats"), py::arg("eps"),
          py::arg("normalization"), py::arg("save"));
    m.def("bnlstm_backward_cpu", &fused_bnlstm::backward, "BN-LSTM layer backward on the CPU (see csrc/bnlstm.h)",
          py::arg("grad_output"), py::arg("grad_h_n"), py::arg("grad_c_n"), py::arg("x"), py::arg("weight_ih"),
          py::arg("weight_hh"), py::arg("gamma_ih"), py::arg("gamma_hh"), py::arg("gamma_c"), py::arg("has_bias"),
          py::arg("lengths"), py::arg("hs"), py::arg("cs"), py::arg("gates"), py::arg("xhat_ih"),
          py::arg("xhat_hh"), py::arg("xhat_c"), py::arg("tanh_c"), py::arg("rstd_ih"), py::arg("rstd_hh"),
          py::arg("rstd_c"), py::arg("seq_rstd"), py::arg("use_batch_stats"), py::arg("normalization"),
          py::arg("need_dx"));
    m.def("empty_cache", &fused_bnlstm::empty_cache,
          "Hand the cached CPU buffers of earlier calls back to the OS (see csrc/workspace.cpp)");
    m.def("kernel_isa", [] { return std::string(fused_bnlstm::kernel_isa()); },
          "The instruction set the step kernels were picked for on this CPU");
    m.def("uses_brgemm", &fused_bnlstm::use_brgemm,
          "Whether float32 per-step GEMMs run through oneDNN's brgemm (else at::mm)");
    m.def("cached_bytes", &fused_bnlstm::cached_bytes, "Bytes of CPU buffers cached for reuse now");
}
