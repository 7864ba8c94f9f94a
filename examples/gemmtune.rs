//! GEMM throughput at the benchmark model's shapes against the measured peak.
//! Usage: RAYON_NUM_THREADS=1 cargo run --release --example gemmtune
use half::bf16;
use llada::candle_core::DType;
use llada::kernels::gemm::{self, AOperand, BOperand, PackedBf16, PackedF32};
use std::time::Instant;

fn main() {
    let pf32 = llada::kernels::peak::peak_gflops(DType::F32, 300).unwrap_or(0.0);
    let pbf = llada::kernels::peak::peak_gflops(DType::BF16, 300).unwrap_or(0.0);
    println!("peak f32 {pf32:.0} GFLOP/s · bf16 {pbf:.0} GFLOP/s");
    let mut r = llada::Rng::new(1);
    // cold weights: cycle through copies that together exceed the caches
    for &(m, n, k) in &[
        (192usize, 4096usize, 768usize),
        (192, 768, 2048),
        (32, 32768, 768),
    ] {
        let copies = (300_000_000 / (n * k * 2)).max(2);
        let a: Vec<bf16> = (0..m * k)
            .map(|_| bf16::from_f32(r.normal() as f32))
            .collect();
        let ws: Vec<PackedBf16> = (0..copies)
            .map(|_| {
                let w: Vec<bf16> = (0..n * k)
                    .map(|_| bf16::from_f32(r.normal() as f32))
                    .collect();
                PackedBf16::from_weight(&w, n, k)
            })
            .collect();
        let mut out = vec![0f32; m * n];
        let t = Instant::now();
        for _ in 0..2 {
            for w in &ws {
                gemm::bf16gemm(m, &a, k, w, &mut out, n);
            }
        }
        let dt = t.elapsed().as_secs_f64() / (2 * copies) as f64;
        let flop = 2.0 * (m * n * k) as f64;
        drop(ws);
        let copies = (copies / 2).max(2);
        let af: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
        let wf: Vec<PackedF32> = (0..copies)
            .map(|_| {
                let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
                PackedF32::from_weight(&w, n, k)
            })
            .collect();
        let t = Instant::now();
        for _ in 0..2 {
            for w in &wf {
                gemm::sgemm(
                    m,
                    n,
                    k,
                    AOperand {
                        data: &af,
                        rs: k,
                        cs: 1,
                    },
                    BOperand::Packed(w),
                    &mut out,
                    n,
                    false,
                );
            }
        }
        let df = t.elapsed().as_secs_f64() / (2 * copies) as f64;
        println!(
            "cold {m}x{n}x{k}: f32 {:.0} GFLOP/s ({:.0}%)",
            flop / df / 1e9,
            100.0 * flop / df / 1e9 / pf32
        );
        println!(
            "cold {m}x{n}x{k} ({copies} weights): bf16 {:.0} GFLOP/s ({:.0}%), {:.1} GB/s of weights",
            flop / dt / 1e9,
            100.0 * flop / dt / 1e9 / pbf,
            (n * k * 2) as f64 / dt / 1e9
        );
    }
    for &(m, n, k) in &[
        (192usize, 768usize, 768usize),
        (192, 4096, 768),
        (192, 768, 2048),
        (32, 32768, 768),
        (32, 4096, 768),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
        let pf = PackedF32::from_weight(&w, n, k);
        let ab: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let pb = PackedBf16::from_weight(&wb, n, k);
        let mut out = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            let mut it = 0;
            while t.elapsed().as_secs_f64() < 0.5 {
                f();
                it += 1;
            }
            t.elapsed().as_secs_f64() / it as f64
        };
        let tf = time(&mut || {
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
                &mut out,
                n,
                false,
            )
        });
        let tb = time(&mut || gemm::bf16gemm(m, &ab, k, &pb, &mut out, n));
        println!(
            "{m}x{n}x{k}: f32 {:.0} GFLOP/s ({:.0}%) · bf16 {:.0} GFLOP/s ({:.0}%)",
            flop / tf / 1e9,
            100.0 * flop / tf / 1e9 / pf32,
            flop / tb / 1e9,
            100.0 * flop / tb / 1e9 / pbf
        );
    }
}
