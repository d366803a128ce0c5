// fused_bnlstm._C: the layer ops torch.ops.fused_bnlstm.bnlstm_forward and bnlstm_backward (schemas below,
// registered with TORCH_LIBRARY; their fake implementations and autograd formula are registered in
// fused_bnlstm/ops/fused_cpp.py), and a pybind11 module with the small helpers. This file checks what the
// kernels index with, allocates the buffers and fills the parameter structs; the time loops are in
// bnlstm_cpu.cpp, every buffer's shape in bnlstm.h.

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bnlstm.h"
#include "bnlstm_cpu.h"
#include "workspace.h"

namespace fused_bnlstm {

namespace {

using OptTensor = std::optional<at::Tensor>;

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Hidden-unit chunk c0 of a chunk-major step gradient (BackwardParams::da_chunked, a [T, B, 4H] buffer):
// its rows over all steps, [T * B, 4w] with gate k's w columns at k * w (w = min(kBlock, H - c0)).
at::Tensor gradient_chunk(const at::Tensor& da, int64_t H, int64_t c0) {
    const int64_t T = da.size(0), B = da.size(1), w = std::min(kBlock, H - c0);
    return da.view({-1}).narrow(0, chunk_major_offset(T, 0, B, H, c0), T * B * 4 * w).view({T * B, 4 * w});
}

// Rows of a [4H, Q] weight (or its gradient) for chunk c0, gate by gate: [4w, Q] (a copy).
at::Tensor weight_chunk(const at::Tensor& weight, int64_t H, int64_t c0) {
    const int64_t w = std::min(kBlock, H - c0);
    return at::cat({weight.narrow(0, c0, w), weight.narrow(0, H + c0, w), weight.narrow(0, 2 * H + c0, w),
                    weight.narrow(0, 3 * H + c0, w)});
}

// da^T b for a chunk-major da and b [T * B, Q]: [4H, Q], gate-major as the weights (gemm_tn per chunk).
at::Tensor chunked_gemm_tn(const at::Tensor& da, const at::Tensor& b, int64_t H) {
    at::Tensor result = at::empty({4 * H, b.size(1)}, b.options());
    for (int64_t c0 = 0; c0 < H; c0 += kBlock) {
        const int64_t w = std::min(kBlock, H - c0);
        const at::Tensor part = gemm_tn(gradient_chunk(da, H, c0), b);  // [4w, Q]
        for (int64_t k = 0; k < 4; ++k) result.narrow(0, k * H + c0, w).copy_(part.narrow(0, k * w, w));
    }
    return result;
}

// da w for a chunk-major da and w [4H, Q]: [T * B, Q] (gemm_nn per chunk, summed).
at::Tensor chunked_gemm_nn(const at::Tensor& da, const at::Tensor& w, int64_t H) {
    at::Tensor result;
    for (int64_t c0 = 0; c0 < H; c0 += kBlock) {
        at::Tensor part = gemm_nn(gradient_chunk(da, H, c0), weight_chunk(w, H, c0));
        result = c0 == 0 ? part : result.add_(part);
    }
    return result;
}

// A [0]-sized stand-in for a result a mode does not have (op results are never undefined).
at::Tensor absent(const at::TensorOptions& options) { return at::empty({0}, options); }
at::Tensor or_absent(const at::Tensor& t, const at::TensorOptions& options) {
    return t.defined() ? t : absent(options);
}

// A contiguous CPU tensor of the given dtype and shape, or an error naming the argument.
at::Tensor expect(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == shape,
                "fused_bnlstm: ", name, " must be a CPU ", dtype, " tensor of shape ", shape, ", got ",
                t.defined() ? t.toString() : std::string("None"), " of shape ",
                t.defined() ? t.sizes() : at::IntArrayRef{});
    return t.contiguous();
}

Normalization to_normalization(const std::optional<c10::string_view>& name) {
    if (!name.has_value()) return Normalization::kNone;
    if (*name == "frame") return Normalization::kFrame;
    TORCH_CHECK(*name == "sequence", "fused_bnlstm: normalization must be 'frame', 'sequence' or None, got ",
                std::string(*name));
    return Normalization::kSequence;
}

// What both ops read: the input, the weights, the per-step plan (from fused_bnlstm.ops.prepare_layer).
struct Layer {
    at::Tensor x, w_ih, w_hh, gamma_ih, gamma_hh, gamma_c, beta_c, w_hr, lengths;
    int64_t T, B, I, H, G;
    int64_t P;  // the recurrent state's width: proj_size with a projection (w_hr defined), else H
    Normalization norm;
    at::IntArrayRef counts;            // [T]
    std::vector<uint8_t> batch_stats;  // frame [T], sequence [1], None empty
    bool frame() const { return norm == Normalization::kFrame; }
    bool sequence() const { return norm == Normalization::kSequence; }
    bool projected() const { return w_hr.defined(); }
};

// weights: weight_ih [4H, I], weight_hh [4H, P], then the normalization's batch-norm scales in LayerParams
// order (frame: gamma_ih, gamma_hh, gamma_c, beta_c; sequence: gamma_ih), then with a projection weight_hr
// [P, H] (P = H without one).
Layer parse_layer(const at::Tensor& x, at::TensorList weights, const OptTensor& lengths, at::IntArrayRef counts,
                  const c10::List<bool>& batch_stats, const std::optional<c10::string_view>& normalization) {
    Layer l;
    l.norm = to_normalization(normalization);
    TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                    x.dim() == 3,
                "fused_bnlstm (cpp): x must be a float32 or float64 CPU tensor [T, B, I], got ", x.toString(),
                " of shape ", x.sizes());
    const size_t n_weights = l.frame() ? 6 : l.sequence() ? 3 : 2;
    TORCH_CHECK(weights.size() == n_weights || weights.size() == n_weights + 1, "fused_bnlstm: expected ",
                n_weights, " weights (", n_weights + 1, " with weight_hr), got ", weights.size());
    const bool projected = weights.size() == n_weights + 1;
    const at::Tensor& sizes_from = projected ? weights.back() : weights[1];  // [P, H] or [4H, H]
    l.T = x.size(0);
    l.B = x.size(1);
    l.I = x.size(2);
    l.H = sizes_from.dim() == 2 ? sizes_from.size(1) : 0;
    l.P = projected ? sizes_from.size(0) : l.H;
    l.G = 4 * l.H;
    const at::ScalarType dtype = x.scalar_type();
    l.x = x.contiguous();
    l.w_ih = expect(weights[0], "weight_ih", dtype, {l.G, l.I});
    l.w_hh = expect(weights[1], "weight_hh", dtype, {l.G, l.P});
    if (projected) l.w_hr = expect(weights.back(), "weight_hr", dtype, {l.P, l.H});
    if (l.frame() || l.sequence()) l.gamma_ih = expect(weights[2], "gamma_ih", dtype, {l.G});
    if (l.frame()) {
        l.gamma_hh = expect(weights[3], "gamma_hh", dtype, {l.G});
        l.gamma_c = expect(weights[4], "gamma_c", dtype, {l.H});
        l.beta_c = expect(weights[5], "beta_c", dtype, {l.H});
    }
    if (lengths.has_value()) l.lengths = expect(*lengths, "lengths", at::kLong, {l.B});
    TORCH_CHECK(int64_t(counts.size()) == l.T, "fused_bnlstm: expected ", l.T, " counts, got ", counts.size());
    l.counts = counts;
    const size_t n_flags = l.frame() ? size_t(l.T) : l.sequence() ? 1 : 0;
    TORCH_CHECK(batch_stats.size() == n_flags, "fused_bnlstm: expected ", n_flags, " batch_stats flags, got ",
                batch_stats.size());
    for (const bool flag : batch_stats) l.batch_stats.push_back(flag);
    return l;
}

// What forward keeps for backward, in the order of the forward op's `saved` result (named in
// fused_cpp.SavedBuffers; shapes in bnlstm.h). Undefined where a mode has none.
struct Saved {
    at::Tensor hs, cs, gates, xhat_ih, xhat_hh, xhat_c, tanh_c, rstd_ih, rstd_hh, rstd_c, seq_rstd;
    at::Tensor rs;  // with a projection: r_t (ProjectedStates in bnlstm_cpu.h); hs then holds the kernels' m_t

    std::vector<at::Tensor> to_list(const at::TensorOptions& options) const {
        std::vector<at::Tensor> out;
        for (const at::Tensor* t : {&hs, &cs, &gates, &xhat_ih, &xhat_hh, &xhat_c, &tanh_c, &rstd_ih, &rstd_hh,
                                    &rstd_c, &seq_rstd, &rs}) {
            out.push_back(or_absent(*t, options));
        }
        return out;
    }
};

// The saved list handed back to backward, checked against the shapes forward gave it.
Saved parse_saved(at::TensorList list, const Layer& l) {
    TORCH_CHECK(list.size() == 12, "fused_bnlstm: expected the 12 saved buffers of forward, got ", list.size());
    const at::ScalarType dtype = l.x.scalar_type(), acc = at::toOpMathType(dtype);
    const int64_t T = l.T, B = l.B, H = l.H, G = l.G;
    Saved s;
    s.hs = expect(list[0], "saved hs", dtype, {T + 1, B, H});
    s.cs = expect(list[1], "saved cs", dtype, {T + 1, B, H});
    s.gates = expect(list[2], "saved gates", dtype, {T, B, G});
    s.tanh_c = expect(list[6], "saved tanh_c", dtype, {T, B, H});
    if (l.frame() || l.sequence()) s.xhat_ih = expect(list[3], "saved xhat_ih", dtype, {T, B, G});
    if (l.frame()) {
        s.xhat_hh = expect(list[4], "saved xhat_hh", dtype, {T, B, G});
        s.xhat_c = expect(list[5], "saved xhat_c", dtype, {T, B, H});
        s.rstd_ih = expect(list[7], "saved rstd_ih", acc, {T, G});
        s.rstd_hh = expect(list[8], "saved rstd_hh", acc, {T, G});
        s.rstd_c = expect(list[9], "saved rstd_c", acc, {T, H});
    }
    if (l.sequence()) s.seq_rstd = expect(list[10], "saved seq_rstd", acc, {G});
    if (l.projected()) s.rs = expect(list[11], "saved rs", dtype, {T + 1, B, l.P});
    return s;
}

// The fields forward and backward share (causal-conv1d's set_conv_params style).
void set_common_params(StepParamsBase& p, const Layer& l, const Saved& s) {
    p.T = l.T;
    p.B = l.B;
    p.I = l.I;
    p.H = l.H;
    p.norm = l.norm;
    p.running = RowMask{l.lengths.defined() ? l.lengths.data_ptr<int64_t>() : nullptr};
    p.counts = l.counts.data();
    p.batch_stats = l.batch_stats.data();
    p.gamma_ih = ptr_or_null(l.gamma_ih);
    p.gamma_hh = ptr_or_null(l.gamma_hh);
    p.gamma_c = ptr_or_null(l.gamma_c);
    p.hs = ptr_or_null(s.hs);
    p.cs = ptr_or_null(s.cs);
    p.gates = ptr_or_null(s.gates);
    p.xhat_ih = ptr_or_null(s.xhat_ih);
    p.xhat_hh = ptr_or_null(s.xhat_hh);
    p.xhat_c = ptr_or_null(s.xhat_c);
    p.tanh_c = ptr_or_null(s.tanh_c);
    p.rstd_ih = ptr_or_null(s.rstd_ih);
    p.rstd_hh = ptr_or_null(s.rstd_hh);
    p.rstd_c = ptr_or_null(s.rstd_c);
    p.seq_rstd = ptr_or_null(s.seq_rstd);
}

bool any_flag(const std::vector<uint8_t>& flags) {
    for (const uint8_t f : flags) {
        if (f) return true;
    }
    return false;
}

// Whether a call synchronizes its statistics over a process group: with batch statistics on some step (None
// takes no statistics: nothing to synchronize).
bool synced_call(const Layer& l, const std::optional<c10::string_view>& group_name) {
    return group_name.has_value() && (l.frame() || l.sequence()) && any_flag(l.batch_stats);
}

// [T, B] bool: whether row b runs at step t (lengths[b] > t).
at::Tensor running_rows(const Layer& l) {
    const at::Tensor steps = at::arange(l.T, at::kLong).unsqueeze(1);
    return l.lengths.defined() ? steps < l.lengths.unsqueeze(0) : at::ones({l.T, l.B}, at::kBool);
}

}  // namespace

// bnlstm_forward: see the schema in TORCH_LIBRARY below and fused_cpp.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> forward(
    const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in, at::TensorList weights,
    const OptTensor& bias_in, const OptTensor& lengths, at::IntArrayRef counts, const c10::List<bool>& batch_stats,
    at::TensorList population, double eps, std::optional<c10::string_view> normalization, bool save,
    std::optional<c10::string_view> group_name) {
    const Layer l = parse_layer(x_in, weights, lengths, counts, batch_stats, normalization);
    const bool synced = synced_call(l, group_name);
    begin_workspace_call();
    const int64_t T = l.T, B = l.B, I = l.I, H = l.H, G = l.G;
    const at::ScalarType dtype = l.x.scalar_type();
    const auto opts = l.x.options();
    const auto acc_opts = opts.dtype(at::toOpMathType(dtype));
    const at::Tensor h0 = expect(h0_in, "h0", dtype, {B, l.P}), c0 = expect(c0_in, "c0", dtype, {B, H});
    const at::Tensor bias = bias_in.has_value() ? expect(*bias_in, "bias", dtype, {G}) : at::Tensor();

    // Population statistics: frame [T, 4H] x 4 and [T, H] x 2, sequence [1, 4H] x 2 (means, variances).
    const size_t n_population = l.frame() ? 6 : l.sequence() ? 2 : 0;
    TORCH_CHECK(population.size() == n_population, "fused_bnlstm: expected ", n_population,
                " population tensors, got ", population.size());
    std::vector<at::Tensor> pop;
    for (size_t k = 0; k < n_population; ++k) {
        const int64_t rows = l.frame() ? T : 1, width = k < 4 ? G : H;
        pop.push_back(expect(population[k], "population statistics", dtype, {rows, width}));
    }
    pop.resize(6);

    // The input branch W_ih x. Either one GEMM over all steps, or (float32 with brgemm) inside the step's
    // pass next to the recurrent GEMM, where it stays in cache instead of a [T, B, 4H] round trip through
    // memory: for a small input (I <= 16: the big GEMM has almost no work per byte), when nothing is saved
    // (eval, inference: then no [T, B, 4H] buffer exists at all; char-PTB eval at 2 threads 218-230 -> 198-200
    // ms) or when the step runs on one thread (README.md). Training with split steps keeps the one GEMM
    // (char-PTB training forward at 2 threads 278-283 against 286-296 ms per step). Sequence-wise needs its
    // statistics over every frame before the loop.
    const bool input_per_step = dtype == at::kFloat && !l.sequence() && !l.projected() && !synced &&
                                step_brgemm(B, H, I) &&
                                (I <= 16 || !save || step_on_one_thread(B, H, I));
    // Frame-wise, training keeps the normalized input branch in its own chunked history (StepRows in
    // bnlstm_kernels.inc), so computed per step the input branch needs only one step's scratch. For None
    // the activations, and sequence-wise xhat_ih, are written over it: then it is the [T, B, 4H] history.
    const bool a_ih_scratch = input_per_step && (!save || l.frame());
    at::Tensor a_ih = empty_workspace({a_ih_scratch ? 1 : T, B, G}, opts);
    if (!input_per_step) {
        at::Tensor a_ih_rows = a_ih.view({T * B, G});
        gemm_nn_out(a_ih_rows, l.x.view({T * B, I}), l.w_ih.t().contiguous());  // W_ih^T [I, 4H]
    }
    at::Tensor a_hh = empty_workspace({B, G}, opts);

    Saved s;
    s.hs = empty_workspace({save ? T + 1 : 2, B, H}, opts);
    s.cs = empty_workspace({save ? T + 1 : 2, B, H}, opts);
    s.cs.select(0, 0).copy_(c0);
    PlainLoop loop;  // what the plain loops run besides the kernels: a projection, synchronized statistics
    loop.hs = s.hs;
    loop.cs = s.cs;
    if (l.projected()) {
        s.hs.select(0, 0).zero_();
        s.rs = empty_workspace({save ? T + 1 : 2, B, l.P}, opts);
        s.rs.select(0, 0).copy_(h0);
        loop.w_hr = l.w_hr;
        loop.rs = s.rs;
        loop.output = empty_workspace({T, B, l.P}, opts);
    } else {
        s.hs.select(0, 0).copy_(h0);
    }
    if (l.norm == Normalization::kNone) {
        s.gates = a_ih;  // the activations are written over the input branch
    } else {
        s.gates = empty_workspace({save ? T : 1, B, G}, opts);
        s.xhat_ih = (l.frame() && save) ? empty_workspace({T, B, G}, opts) : a_ih;
    }
    if (save) s.tanh_c = empty_workspace({T, B, H}, opts);
    if (l.frame() && save) {
        s.xhat_hh = empty_workspace({T, B, G}, opts);
        s.xhat_c = empty_workspace({T, B, H}, opts);
        s.rstd_ih = empty_workspace({T, G}, acc_opts);
        s.rstd_hh = empty_workspace({T, G}, acc_opts);
        s.rstd_c = empty_workspace({T, H}, acc_opts);
    }
    at::Tensor seq_mean;
    if (l.sequence()) {
        seq_mean = empty_workspace({G}, acc_opts);
        s.seq_rstd = empty_workspace({G}, acc_opts);
    }
    // Batch statistics (acc_t): frame [T, 4H] x 4, [T, H] x 2 where some step uses them; sequence [1, 4H] x 2.
    std::vector<at::Tensor> moments;
    // (synchronized, the moments are the group's: PlainLoop::given below)
    if (!synced && l.frame() && any_flag(l.batch_stats)) {
        for (const int64_t width : {G, G, G, G, H, H}) moments.push_back(empty_workspace({T, width}, acc_opts));
    } else if (!synced && l.sequence() && l.batch_stats[0]) {
        for (int k = 0; k < 2; ++k) moments.push_back(empty_workspace({1, G}, acc_opts));
    }
    // The kernels' h output: the layer's output, or with a projection the m_t they write and nobody reads.
    at::Tensor output = empty_workspace({T, B, H}, opts);

    ForwardParams p{};
    set_common_params(p, l, s);
    p.eps = eps;
    p.save = save;
    p.bias = ptr_or_null(bias);
    p.beta_c = ptr_or_null(l.beta_c);
    p.pop_mean_ih = ptr_or_null(pop[0]);
    p.pop_var_ih = ptr_or_null(pop[1]);
    p.pop_mean_hh = ptr_or_null(pop[2]);
    p.pop_var_hh = ptr_or_null(pop[3]);
    p.pop_mean_c = ptr_or_null(pop[4]);
    p.pop_var_c = ptr_or_null(pop[5]);
    p.a_ih = a_ih.data_ptr();
    p.a_ih_step = a_ih_scratch ? 0 : B * G;
    p.input_per_step = input_per_step;
    p.x = l.x.data_ptr();
    p.w_ih = l.w_ih.data_ptr();
    p.a_hh = a_hh.data_ptr();
    p.seq_mean = ptr_or_null(seq_mean);
    if (!moments.empty()) {
        void** fields[] = {&p.mean_ih, &p.var_ih, &p.mean_hh, &p.var_hh, &p.mean_c, &p.var_c};
        for (size_t k = 0; k < moments.size(); ++k) *fields[k] = moments[k].data_ptr();
    }
    p.output = output.data_ptr();
    // Synchronized: the kernels normalize with moments over the group, as with a population's (PlainLoop).
    const std::vector<uint8_t> no_batch_stats(synced ? l.batch_stats.size() : 0, 0);
    if (synced) {
        loop.group = std::string(*group_name);
        loop.batch_stats = l.batch_stats.data();
        loop.running = running_rows(l);
        loop.a_ih = a_ih;
        p.batch_stats = no_batch_stats.data();
        const void** fields[] = {&p.pop_mean_ih, &p.pop_var_ih, &p.pop_mean_hh, &p.pop_var_hh, &p.pop_mean_c,
                                 &p.pop_var_c};
        for (size_t k = 0; k < n_population; ++k) {
            loop.given[k] = pop[k].clone();
            *fields[k] = loop.given[k].data_ptr();
        }
        moments.assign(loop.given.begin(), loop.given.begin() + n_population);
    }
    if (H > 0 && (synced || (B > 0 && l.projected()))) {
        forward_plain_cpu(p, a_hh, l.w_hh, loop);  // synchronized: every rank, with rows or without
    } else if (B > 0 && H > 0) {
        forward_cpu(p, a_hh, s.hs, l.w_hh);
    }

    // Results: no moments where no step used batch statistics ([0]-sized, one per moment of the mode).
    while (moments.size() < n_population) moments.push_back(absent(acc_opts));
    const int64_t last = save ? T : (T & 1);
    at::Tensor h_n = (l.projected() ? s.rs : s.hs).select(0, last).clone();
    at::Tensor c_n = s.cs.select(0, last).clone();
    std::vector<at::Tensor> saved = save ? s.to_list(opts) : std::vector<at::Tensor>{};
    return {l.projected() ? loop.output : output, h_n, c_n, moments, saved};
}

// bnlstm_backward: see the schema in TORCH_LIBRARY below and fused_cpp.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor> backward(
    const OptTensor& grad_output_in, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const at::Tensor& x_in,
    at::TensorList weights, bool has_bias, const OptTensor& lengths, at::IntArrayRef counts,
    const c10::List<bool>& batch_stats, at::TensorList saved_list, std::optional<c10::string_view> normalization,
    bool need_dx, std::optional<c10::string_view> group_name) {
    const Layer l = parse_layer(x_in, weights, lengths, counts, batch_stats, normalization);
    const bool synced = synced_call(l, group_name);
    const Saved s = parse_saved(saved_list, l);
    begin_workspace_call();
    const int64_t T = l.T, B = l.B, I = l.I, H = l.H, G = l.G, P = l.P;
    const at::ScalarType dtype = l.x.scalar_type();
    const auto opts = l.x.options();
    const auto acc_opts = opts.dtype(at::toOpMathType(dtype));
    // An expanded cotangent (from out.sum()) is read as a contiguous one: copied into a cached buffer.
    at::Tensor grad_output;
    if (grad_output_in.has_value()) {
        const at::Tensor g = *grad_output_in;
        TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == dtype && g.sizes() == at::IntArrayRef({T, B, P}),
                    "fused_bnlstm: grad_output must be a CPU ", dtype, " tensor of shape [", T, ", ", B, ", ", P,
                    "], got ", g.toString(), " of shape ", g.sizes());
        grad_output = g.is_contiguous() ? g : workspace_copy(g);
    }
    // dh and dc hold the gradient of the state after the current step (h_n, c_n first); backward writes them.
    at::Tensor dh = grad_h_n.has_value() ? expect(*grad_h_n, "grad_h_n", dtype, {B, P}).clone() : at::zeros({B, P}, opts);
    at::Tensor dc = grad_c_n.has_value() ? expect(*grad_c_n, "grad_c_n", dtype, {B, H}).clone() : at::zeros({B, H}, opts);
    at::Tensor dh_prev = empty_workspace({B, P}, opts);
    at::Tensor da_hh = empty_workspace({T, B, G}, opts);
    at::Tensor da_ih = l.norm == Normalization::kNone ? da_hh : empty_workspace({T, B, G}, opts);
    const bool normalized = l.frame() || l.sequence();
    at::Tensor dbias = (has_bias && normalized) ? at::zeros({G}, acc_opts) : at::Tensor();
    at::Tensor dgamma_ih = normalized ? at::zeros({G}, acc_opts) : at::Tensor();
    at::Tensor dgamma_hh = l.frame() ? at::zeros({G}, acc_opts) : at::Tensor();
    at::Tensor dgamma_c = l.frame() ? at::zeros({H}, acc_opts) : at::Tensor();
    at::Tensor dbeta_c = l.frame() ? at::zeros({H}, acc_opts) : at::Tensor();

    BackwardParams p{};
    set_common_params(p, l, s);
    p.grad_output = l.projected() ? nullptr : ptr_or_null(grad_output);  // projected: folded into dr
    p.dc = dc.data_ptr();
    p.da_hh = da_hh.data_ptr();
    p.da_ih = da_ih.data_ptr();
    p.dbias = ptr_or_null(dbias);
    p.dgamma_ih = ptr_or_null(dgamma_ih);
    p.dgamma_hh = ptr_or_null(dgamma_hh);
    p.dgamma_c = ptr_or_null(dgamma_c);
    p.dbeta_c = ptr_or_null(dbeta_c);
    PlainLoop loop;
    if (l.projected()) {
        loop.w_hr = l.w_hr;
        loop.grad_output = grad_output;
        loop.dr_run = at::zeros({T, B, P}, opts);
    }
    if (synced) loop.group = std::string(*group_name);
    if (H > 0 && (synced || (B > 0 && l.projected()))) {
        backward_plain_cpu(p, dh, dh_prev, da_hh, l.w_hh, loop);  // synchronized: every rank, with rows or without
    } else if (B > 0 && H > 0) {
        backward_cpu(p, dh, dh_prev, da_hh, l.w_hh);
    } else {
        da_hh.zero_();
        da_ih.zero_();
    }

    // Weight gradients and dx: GEMMs over all T * B rows (per hidden-unit chunk where the step gradients
    // are chunk-major).
    const at::Tensor x_rows = l.x.view({T * B, I});
    // the recurrent GEMM's operand: h_{t-1}, or with a projection r_{t-1}
    const at::Tensor h_rows = (l.projected() ? s.rs : s.hs).narrow(0, 0, T).view({T * B, P});
    std::vector<at::Tensor> grad_weights;
    at::Tensor grad_x;
    if (p.da_chunked) {
        grad_weights = {chunked_gemm_tn(da_ih, x_rows, H), chunked_gemm_tn(da_hh, h_rows, H)};
        grad_x = need_dx ? chunked_gemm_nn(da_ih, l.w_ih, H).view({T, B, I}) : absent(opts);
    } else {
        const at::Tensor da_ih_rows = da_ih.view({T * B, G});
        const at::Tensor da_hh_rows = da_hh.view({T * B, G});
        grad_weights = {gemm_tn(da_ih_rows, x_rows), gemm_tn(da_hh_rows, h_rows)};
        grad_x = need_dx ? gemm_nn(da_ih_rows, l.w_ih).view({T, B, I}) : absent(opts);
        if (has_bias && !normalized) dbias = da_hh_rows.sum(0);
    }
    for (const at::Tensor* g : {&dgamma_ih, &dgamma_hh, &dgamma_c, &dbeta_c}) {
        if (g->defined()) grad_weights.push_back(g->to(dtype));
    }
    if (l.projected()) {
        // dW_hr = sum over steps of dr_t^T m_t, on the running rows (dr_run is zero elsewhere)
        grad_weights.push_back(gemm_tn(loop.dr_run.view({T * B, P}), s.hs.narrow(0, 1, T).view({T * B, H})));
    }
    at::Tensor grad_bias = has_bias ? dbias.to(dtype) : absent(opts);
    return {grad_x, dh, dc, grad_weights, grad_bias};
}

}  // namespace fused_bnlstm

// The schemas: fixed arity, results in named groups. weights = weight_ih, weight_hh, then the
// normalization's batch-norm scales, then weight_hr with a projection (see parse_layer; h0, h_n, output and
// their gradients are then P wide); counts and batch_stats as prepare_layer computes them; population:
// frame 6, sequence 2, None 0 tensors. moments: frame 6 (mean_ih, var_ih, mean_hh, var_hh, mean_c, var_c),
// sequence 2, None 0, each [0]-sized when no step used batch statistics; saved: 12 buffers (Saved above)
// when save, else none. Absent results are [0]-sized, never undefined.
TORCH_LIBRARY(fused_bnlstm, m) {
    m.set_python_module("fused_bnlstm.ops.fused_cpp");
    m.def("bnlstm_forward(Tensor x, Tensor h0, Tensor c0, Tensor[] weights, Tensor? bias, Tensor? lengths, "
          "int[] counts, bool[] batch_stats, Tensor[] population, float eps, str? normalization, bool save, "
          "str? group_name) -> "
          "(Tensor output, Tensor h_n, Tensor c_n, Tensor[] moments, Tensor[] saved)");
    m.def("bnlstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor[] weights, "
          "bool has_bias, Tensor? lengths, int[] counts, bool[] batch_stats, Tensor[] saved, str? normalization, "
          "bool need_dx, str? group_name) -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_weights, "
          "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fused_bnlstm, CPU, m) {
    m.impl("bnlstm_forward", &fused_bnlstm::forward);
    m.impl("bnlstm_backward", &fused_bnlstm::backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fused_bnlstm compiled extension: the CPU layer ops (torch.ops.fused_bnlstm) and their helpers";
    m.def("empty_cache", &fused_bnlstm::empty_cache,
          "Hand the cached CPU buffers of earlier calls back to the OS (see csrc/workspace.cpp)");
    m.def("kernel_isa", [] { return std::string(fused_bnlstm::kernel_isa()); },
          "The instruction set the step kernels were picked for on this CPU");
    m.def("uses_brgemm", &fused_bnlstm::use_brgemm,
          "Whether float32 per-step GEMMs run through oneDNN's brgemm (else at::mm)");
    m.def("gemm_backend", [] { return std::string(fused_bnlstm::gemm_through_brgemm() ? "brgemm" : "mm"); },
          "What the float32 all-step GEMMs (input branch, weight gradients, dx) run through here: brgemm or mm");
    m.def("cached_bytes", &fused_bnlstm::cached_bytes, "Bytes of CPU buffers cached for reuse now");
    m.def("brgemm_shapes", [] {
        const auto [gemm, steps] = fused_bnlstm::brgemm_shapes();
        py::dict d;
        d["gemm"] = gemm;
        d["steps"] = steps;
        return d;
    }, "Distinct brgemm kernel shapes asked of oneDNN (which keeps each for the process's lifetime): gemm, "
       "the all-step GEMMs' shapes; steps, the (B, H, I) admitted to per-step brgemm (at most 16)");
    m.def("workspace_stats", [] {
        const fused_bnlstm::WorkspaceStats s = fused_bnlstm::workspace_stats();
        py::dict d;
        d["cached"] = s.cached;
        d["in_use"] = s.in_use;
        d["working_set"] = s.working_set;
        d["limit"] = s.limit;
        return d;
    }, "The workspace cache's bytes: cached (free, held for reuse), in_use, working_set (the bound on cached: "
       "the most in use at once over the last 32 calls) and limit (min(RAM / 8, 4 GiB))");
}
