"""pq: store weights as product-quantized codebooks, decoded in the graph.

Product quantization of a weight layer ("Compressing Deep Convolutional Networks using Vector
Quantization"; "Compression of Deep Neural Networks on the Fly"): write the layer as y = x W (W: d_in × d_out, the rows of W in the
order of the layer's input features). Each output's column w_j is cut into sub-vectors of length
d along the input features, w_j = [w_1j; …; w_Bj] (B = d_in / d; for a k×k Conv one sub-vector is
one kernel, d = k·k). One codebook C = {c_1 … c_K} (K ≤ 256) per layer; each sub-vector is
replaced by a centroid, stored as a one-byte code, for K ≤ 64 four 6-bit codes in three bytes,
for K ≤ 32 six 5-bit codes in four bytes, for K ≤ 16 two 4-bit codes a byte. Bytes: d_in·d_out·4 → d_in·d_out/d (× 3/4 or ÷ 2 when packed)
+ K·d·(2|4).

Activation-aware assignment ("And the Bit Goes Down: Revisiting the Quantization of Neural
Networks"): the layer's output
error on calibration inputs is ‖X (W − Ŵ)‖² = Σ_j (w_j − ŵ_j)ᵀ H (w_j − ŵ_j), H = Cov(x) + λI
(λ = damp · mean input variance). Steps, per layer:
1. plain k-means on the sub-vectors (k-means++ seeding, vectorised Lloyd steps) initialises C;
2. EM with the diagonal blocks H_b of H: E-step argmin_k (w − c_k)ᵀ H_b (w − c_k), M-step
   c_k = (Σ_{i∈k} H_b(i))⁻¹ Σ_{i∈k} H_b(i) w_i;
3. assignment block by block with error feedback on the full H (optimal brain quantization, as
   in GPTQ/GPTVQ): after block F is assigned, W_R −= U_FRᵀ U_FF⁻ᵀ (W_F − Ŵ_F), H⁻¹ = UᵀU;
4. the codebook refit by least squares on the full H with the codes fixed (conjugate gradient).
Layers are done in topological levels (sequential reconstruction; with at least 4 statistics rows per
input feature, else the target is W): the target of a layer is
W* = argmin ‖X̃ W* − Y‖² + λ‖W* − W‖², with X̃ its inputs in the already-quantized network and Y
its outputs in the original one, and its bias is refit as b = E[y] − E[x̃]ᵀŴ. ``pq.aware=false``
keeps plain k-means on the weights (still with the bias refit).

In the graph: Gather(codebook (Cast fp16 → fp32 when stored as fp16), Cast(codes int8 → int32)
(+ 128 when K > 128)) → Reshape (→ Transpose) → the node's weight input (int8, not uint8, codes:
TensorRT's ONNX parser refuses UINT8). Packed 4-bit codes (``pq.bits``; auto packs K ≤ 16
where it saves bytes) are unpacked without BitShift, which that parser lacks: byte =
16·hi + lo − 128, v = Cast(int32) + 128, hi = v / 16, lo = v − 16·hi, Concat → the same Gather;
6-bit codes as the three bytes of u = 2¹⁸p₀ + 2¹²p₁ + 2⁶p₂ + p₃, unpacked with Mul, ReduceSum, Div, Sub
(5-bit codes likewise, the four bytes of a 30-bit word).
All standard ops on constants: runtimes fold them once at load time, so inference runs at the
original speed. Small layers (codes + codebook would not
save bytes) and the model's first Conv (when it holds under a quarter of the weight bytes) stay
dense by default.

Error budget (``pq.max_error``): per layer, the settings (d, K) are tried fewest bytes first (the
default d with 256 centroids, shorter d, pairs with 64 centroids (6-bit codes), scalar codes with
16 centroids packed, with 64 (6-bit, four in three bytes), with 256) and the
first whose relative output error, and a quarter of the mean of its outputs' own relative errors,
are within the budget is kept; after 64 scalar centroids within it, 32 (5-bit codes, six in four
bytes) are fitted where four times the 64's error is within it, and kept when within. Layers inside
If/Loop/Scan subgraphs have no statistics of their own: one that reads a main-graph tensor, or one
its subgraph makes as a main-graph node does (the same op, attributes and inputs), is quantized
under that tensor's input covariance (W the target, the outputs' moments from x·W + b, the bias
refit); the others, and float
tables that only Gather/Slice/Reshape read (embeddings, positional encodings), in weight space.

Error allocation (``pq.allocate=true``, opt-in, with the error budget): the budget is spent across
layers by their measured effect on the model's outputs, like a mixed-precision knapsack. Per layer
(with statistics) each setting of its ladder gets its relative output error e (a quick fit on the
reference statistics) and its bytes b; the layer's gain g is measured by one run over (up to 64
samples of) the calibration data with that layer alone at its cheapest setting: g = the model's
output error (the mean per-sample relative squared error, a quarter of the worst sample's and of
the squared largest error over the output's range, the worst output) / e. Per layer the setting,
or dense, is picked with the fewest total bytes such that Σ g·e is within the larger of
``pq.output_error`` (2e-3) and what the per-layer rule's choice predicts (so that choice is always
feasible: the allocation never costs bytes over it). The choice is then measured, all layers at once at
their quick codes on the same samples: its output error must be within the larger of
``pq.output_error`` and the per-layer rule's choice's measured one, and its decisions flipped
(argmax along the last axis of each float output: labels, the tags a decoder reads) no more than
the rule's; else the aim is lowered, and after 5 tries (or below the rule's predicted error) the
rule's settings are kept. A mean error does not see decisions near their margin: before this
check khmer_segmenter's segmentation (a Viterbi decode of its emissions) broke at every output
budget tried (same segmentation 0.75 at 2e-3) with 20 flipped tags on the calibration data
against the rule's 2; with it the rule's settings are kept there. The full fit of each layer then
starts at its allocated setting and goes up the ladder when its error is over twice the estimate.
It is off by default (not yet measured on every zoo model).

Size budget (``--target-size``): each layer gets candidate (d, K) settings with their output
error and bytes; a Lagrangian search picks per layer the setting minimising Σ relative output
error + λ·bytes, bisecting λ until the serialized model meets the goal.

Modules: ``pass_`` (the pass: checks, order, report), ``config``, ``layer`` (the layers and their
biases), ``target`` (what a layer is quantized toward), ``kmeans``, ``gptq`` and ``quantize`` (one
layer's codebook and codes), ``search`` (the size budget and the error allocation), ``codec`` (the stored code format),
``edits`` (the decode subgraph and bias writes), ``sizes`` (byte counts).
"""

from .codec import code_offset, decoded_weight, pack_codes, pack_codes6, stored_codes, unpack_codes
from .config import CODEBOOK_DTYPES, PqConfig
from .kmeans import aware_em, kmeans
from .gptq import gptq_assign, refine_codebook
from .pass_ import Pq
from .quantize import quantize

__all__ = ["CODEBOOK_DTYPES", "Pq", "PqConfig", "aware_em", "code_offset", "decoded_weight", "gptq_assign",
           "kmeans", "pack_codes", "pack_codes6", "quantize", "refine_codebook", "stored_codes", "unpack_codes"]
