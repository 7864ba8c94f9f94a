//! Criterion micro-benchmarks of the CPU hot kernels at the ~135M benchmark model's shapes
//! (d_model 768, mlp 2048, 12 heads, 192 tokens): the packed GEMM in f32 and bf16, the fused
//! attention, RMSNorm and the sampler's per-step prediction. Throughput is in elements (GEMMs:
//! multiply-adds, so 2× that is FLOP/s). `cargo bench --bench kernels`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use llada::candle_core::{Device, Tensor};
use llada::kernels::attention::{self, KeyMask, KvShape, KvStore, RopeTables};
use llada::kernels::gemm::{self, AOperand, BOperand, PackedBf16, PackedF32};
use llada::Rng;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

fn gemms(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    for &(m, n, k) in &[
        (192usize, 768usize, 768usize),
        (192, 2048, 768),
        (192, 768, 2048),
        (128, 32768, 768),
    ] {
        let a = rand(m * k, 1);
        let w = rand(n * k, 2);
        let pf = PackedF32::from_weight(&w, n, k);
        let ab: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let pb = PackedBf16::from_weight(&wb, n, k);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((m * n * k) as u64));
        g.bench_function(format!("cpu_f32_{m}x{n}x{k}"), |bch| {
            bch.iter(|| {
                gemm::sgemm(
                    m,
                    n,
                    k,
                    AOperand {
                        data: &a,
                        rs: k,
                        cs: 1,
                    },
                    BOperand::Packed(&pf),
                    black_box(&mut out),
                    n,
                    false,
                )
            })
        });
        g.bench_function(format!("cpu_bf16_{m}x{n}x{k}"), |bch| {
            bch.iter(|| gemm::bf16gemm(m, &ab, k, &pb, black_box(&mut out), n))
        });
    }
    g.finish();
}

fn fused_attention(c: &mut Criterion) {
    let (l, h, hd) = (192usize, 12usize, 64usize);
    let shape = KvShape {
        batch: 1,
        kv_heads: h,
        head_dim: hd,
        len: l,
    };
    let q = rand(l * h * hd, 3);
    let k = rand(l * h * hd, 4);
    let v = rand(l * h * hd, 5);
    let rope = llada::model::Rope::new(hd, 500000.0, l, &Device::Cpu).unwrap();
    let (cos, sin) = rope.host(l);
    let tables = RopeTables {
        cos: &cos,
        sin: &sin,
        half: hd / 2,
    };
    let mask = KeyMask {
        valid: None,
        visibility: Default::default(),
    };
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Elements((2 * l * l * h * hd) as u64));
    g.bench_function("cpu_f32_L192_H12", |b| {
        b.iter(|| {
            let mut store = KvStore::new(shape, false);
            store.write(shape, 0, l, &k, &v, &tables);
            black_box(attention::attend(
                &q, shape, h, 0, l, &store, &mask, &tables,
            ))
        })
    });
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let x = Tensor::from_vec(rand(192 * 768, 6), (192, 768), &Device::Cpu).unwrap();
    let w = Tensor::ones(768, llada::candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("elementwise");
    g.throughput(Throughput::Elements((192 * 768) as u64));
    g.bench_function("cpu_rms_norm_192x768", |b| {
        b.iter(|| black_box(llada::kernels::rms_norm(&x, &w, 1e-5).unwrap().unwrap()))
    });
    let gt = Tensor::from_vec(rand(192 * 2048, 7), (192, 2048), &Device::Cpu).unwrap();
    g.throughput(Throughput::Elements((192 * 2048) as u64));
    g.bench_function("cpu_silu_mul_192x2048", |b| {
        b.iter(|| black_box(llada::kernels::silu_mul(&gt, &gt).unwrap()))
    });
    g.finish();
}

fn sampler_step(c: &mut Criterion) {
    use llada::sampler::predict::{predict, PredictOpts};
    use llada::sampler::Remasking;
    let (w, v) = (128usize, 32768usize);
    let logits = Tensor::from_vec(rand(w * v, 8), (1, w, v), &Device::Cpu).unwrap();
    let wanted = vec![(0..w).collect::<Vec<_>>()];
    let opts = PredictOpts {
        temperature: 0.0,
        remasking: Remasking::LowConfidence,
        suppress_logit: None,
        suppress_conf: vec![],
        filter: Default::default(),
    };
    let mut g = c.benchmark_group("sampler");
    g.throughput(Throughput::Elements((w * v) as u64));
    g.bench_function("cpu_predict_128x32768_greedy", |b| {
        b.iter(|| black_box(predict(&logits, None, &wanted, &opts, &mut Rng::new(0)).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = gemms, fused_attention, elementwise, sampler_step
}
criterion_main!(benches);
