//! Per-op timing of one forward (192 tokens) of the 135M benchmark checkpoint.
//! Usage: cargo run --release --example prof [f32|bf16] [CHECKPOINT]
use llada::candle_core::{DType, Device, Module, Tensor};
use llada::kernels::attention::{KeyMask, KvShape, KvStore};
use std::time::Instant;

fn main() {
    let dev = Device::Cpu;
    let dtype = match std::env::args().nth(1).as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    // the benchmark checkpoint that scripts/bench-vs-peer.sh makes, unless a folder is given
    let dir = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "out/bench/bench-135m".into());
    let ck = llada::Checkpoint::load(std::path::Path::new(&dir), Some(dtype), &dev).unwrap();
    let m = ck.model.as_llada().unwrap();
    let l = 192;
    let ids = Tensor::from_vec(
        (0..l as u32).map(|i| i * 7 % 30000).collect::<Vec<_>>(),
        (1, l),
        &dev,
    )
    .unwrap();
    let shape = KvShape {
        batch: 1,
        kv_heads: 12,
        head_dim: 64,
        len: l,
    };
    let mask = KeyMask {
        valid: None,
        visibility: Default::default(),
    };
    let rope = llada::model::Rope::new(64, 500000.0, 4096, &dev).unwrap();
    let mut acc = [0f64; 9];
    let names = [
        "embed",
        "norm1",
        "qkv lin",
        "kv write",
        "attend",
        "out lin+add",
        "norm2",
        "gate/up+silu",
        "down+add",
    ];
    for it in 0..6 {
        let mut t = Instant::now();
        let mut lap = |i: usize, t: &mut Instant| {
            if it > 0 {
                acc[i] += t.elapsed().as_secs_f64();
            }
            *t = Instant::now();
        };
        let mut h = m.wte.embedding(&ids.flatten_all().unwrap()).unwrap();
        lap(0, &mut t);
        for b in &m.blocks {
            let a = b.attn_norm.forward(&h).unwrap();
            lap(1, &mut t);
            let q = b.attn.q_proj.forward(&a).unwrap();
            let k = b.attn.k_proj.forward(&a).unwrap();
            let v = b.attn.v_proj.forward(&a).unwrap();
            lap(2, &mut t);
            let mut store = KvStore::new(shape, dtype == DType::BF16);
            let (c, s) = rope.host(l);
            let tables = llada::kernels::attention::RopeTables {
                cos: &c,
                sin: &s,
                half: 32,
            };
            if dtype == DType::BF16 {
                let ks = k.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                let vs = v.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                store.write(shape, 0, l, &ks, &vs, &tables);
                lap(3, &mut t);
                let qs = q.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                let o =
                    llada::kernels::attention::attend(&qs, shape, 12, 0, l, &store, &mask, &tables);
                let o = Tensor::from_vec(o, (l, 768), &dev).unwrap();
                lap(4, &mut t);
                h = b.attn.attn_out.forward_add(&o, &h).unwrap();
                lap(5, &mut t);
            } else {
                let ks = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let vs = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                store.write(shape, 0, l, &ks, &vs, &tables);
                lap(3, &mut t);
                let qs = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let o =
                    llada::kernels::attention::attend(&qs, shape, 12, 0, l, &store, &mask, &tables);
                let o = Tensor::from_vec(o, (l, 768), &dev).unwrap();
                lap(4, &mut t);
                h = b.attn.attn_out.forward_add(&o, &h).unwrap();
                lap(5, &mut t);
            }
            let f = b.ff_norm.forward(&h).unwrap();
            lap(6, &mut t);
            let llada::model::moe::Ffn::Dense(mlp) = &b.ffn else {
                panic!("this profile is of a dense model");
            };
            let mm = mlp.hidden(&f).unwrap();
            lap(7, &mut t);
            h = mlp.ff_out.forward_add(&mm, &h).unwrap();
            lap(8, &mut t);
        }
    }
    let mut tot = 0.0;
    for (n, a) in names.iter().zip(acc) {
        println!("{n:10} {:7.2} ms", a * 1e3 / 5.0);
        tot += a;
    }
    println!("total blocks {:.2} ms", tot * 1e3 / 5.0);
    let h = Tensor::randn(0f32, 1.0, (128, 768), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let t = Instant::now();
    for _ in 0..5 {
        m.head.forward(&h).unwrap();
    }
    println!(
        "head(128 rows) {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / 5.0
    );
}
