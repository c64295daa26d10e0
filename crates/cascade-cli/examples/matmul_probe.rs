use candle_core::{Device, Tensor};
use std::time::Instant;
fn time<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    f();
    let mut ts = vec![];
    for _ in 0..7 { let t = Instant::now(); f(); ts.push(t.elapsed().as_secs_f64()); }
    ts.sort_by(f64::total_cmp);
    let m = ts[3];
    println!("{name:<40} {:>8.2} ms  {:>6.1} GFLOP/s", m * 1e3, flops / m / 1e9);
}
fn main() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (4096, 384), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (1536, 384), &d).unwrap();
    let wt_c = w.t().unwrap().contiguous().unwrap();
    let f = 4096.0 * 384.0 * 1536.0 * 2.0;
    time("x @ w.t() (strided)", f, || { x.matmul(&w.t().unwrap()).unwrap(); });
    time("x @ wt (contiguous)", f, || { x.matmul(&wt_c).unwrap(); });
    let q = Tensor::randn(0f32, 1., (16, 12, 256, 32), &d).unwrap();
    let k = Tensor::randn(0f32, 1., (16, 12, 256, 32), &d).unwrap();
    let fa = 16.0 * 12.0 * 256.0 * 256.0 * 32.0 * 2.0;
    time("q @ k.t() batched", fa, || { q.matmul(&k.t().unwrap()).unwrap(); });
    time("q @ k.t().contiguous()", fa, || { q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap(); });
    let q3 = q.reshape((192, 256, 32)).unwrap(); let kt3 = k.reshape((192, 256, 32)).unwrap().t().unwrap().contiguous().unwrap();
    time("3d q @ kt contiguous", fa, || { q3.matmul(&kt3).unwrap(); });
    let p = Tensor::randn(0f32, 1., (16, 12, 256, 256), &d).unwrap();
    time("p @ v batched", fa, || { p.matmul(&k).unwrap(); });
    let x3 = Tensor::randn(0f32, 1., (16, 256, 384), &d).unwrap();
    time("transpose(1,2).contiguous 16x256x12x32", 0.0, || { x3.reshape((16,256,12,32)).unwrap().transpose(1,2).unwrap().contiguous().unwrap(); });
    let big = Tensor::randn(0f32, 1., (4096, 1536), &d).unwrap();
    time("gelu fused 4096x1536", 0.0, || { cascade::student::transformer::ops::gelu(&big).unwrap(); });
    let v: Vec<f32> = big.flatten_all().unwrap().to_vec1().unwrap();
    time("scalar candle erf_f32 loop", 0.0, || { let s: f32 = v.iter().map(|x| candle_core::cpu::erf::erf_f32(*x)).sum(); std::hint::black_box(s); });
    time("scalar exp loop", 0.0, || { let s: f32 = v.iter().map(|x| (-x*x).exp()).sum(); std::hint::black_box(s); });
    let b = Tensor::randn(0f32, 1., 1536, &d).unwrap();
    time("broadcast_add bias 4096x1536", 0.0, || { big.broadcast_add(&b).unwrap(); });
}
#[allow(dead_code)]
fn unused() {}
