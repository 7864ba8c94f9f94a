use llada::candle_core::{DType, Device, Tensor};
fn main() {
    let dir = std::env::args().nth(1).unwrap();
    let ck = llada::Checkpoint::load(std::path::Path::new(&dir), Some(DType::F32), &Device::Cpu)
        .unwrap();
    let tr = llada::train::Trainable::from_model(&ck.model).unwrap();
    for l in [7usize, 33, 70] {
        let ids: Vec<u32> = (0..l as u32).map(|i| (i * 37 + 11) % 6000).collect();
        let x = Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
        let a = ck.model.forward(&x, None).unwrap();
        let pos = Tensor::from_vec((0..l as u32).collect::<Vec<_>>(), l, &Device::Cpu).unwrap();
        let b = tr
            .model
            .forward_train_positions(&x, &pos)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("L={l}: max |fused - differentiable| = {d}");
    }
}
