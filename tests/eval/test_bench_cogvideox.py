import pytest
import torch

from ttt_video.eval.bench_cogvideox import kernel_kind, main


@pytest.mark.parametrize("name, kind", [
    ("_mlp_keys_hopper", "ttt-mlp kernels"),
    ("_mlp_fwd_kernel", "ttt-mlp kernels"),
    ("_linear_bwd_kernel", "ttt-linear kernels"),
    ("_inputs_bwd_kernel", "ttt layer kernels"),
    ("_merge_kernel", "ttt layer kernels"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1", "attention"),
    ("nvjet_sm90_tst_192x208_64x4_2x1_v_bz_coopB_bias_TNT", "matrix products"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "matrix products"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>",
     "layer norms"),
    ("_modulated_bwd_kernel", "layer norms"),
    ("Memcpy HtoD (Pinned -> Device)", "host copies"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<addcmul_cuda_kernel>", "other"),
])
def test_profiled_kernels_are_grouped_by_what_they_do(name, kind):
    """The names are those an H100 run of the 63 s training step gave (torch 2.11, cuDNN attention)."""
    assert kernel_kind(name) == kind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_without_a_gpu_the_benchmark_says_so(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--profile", "--skip-diffusers"])
    assert exit.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_profiled_row_prints_its_kinds_and_longest_kernels(capsys):
    from ttt_video.eval import bench_cogvideox as bench

    names = {f"kernel_{i}": ["other", 10.0 - i * 0.5, i + 1] for i in range(bench.TOP_KERNELS + 3)}
    rows = {}
    bench.report(rows, "63s forward, 1 blocks, ttt-mlp", {"s": 0.5, "peak_gb": 1.0, "kernels_ms": {"other": 99.0},
                                                           "kernel_names_ms": names})
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["63s", "forward,", "1", "blocks,", "ttt-mlp", "500.0", "ms", "peak_gb", "1.00"]
    assert out[1].split() == ["other", "99.0", "ms"]
    assert [line.split()[-1] for line in out[2:]] == [f"kernel_{i}" for i in range(bench.TOP_KERNELS)]
    assert out[2].split()[:4] == ["10.0", "ms", "1x", "[other]"]
    assert rows["63s forward, 1 blocks, ttt-mlp"]["kernel_names_ms"] is names
