//! `quad doctor`: which libtorch is loaded, whether CUDA works, which device quad will use.
use anyhow::Result;
use tch::{Device, Kind, Tensor};

pub struct DoctorReport {
    pub libtorch_version: &'static str,
    pub libtorch_path: Option<String>,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub device: Device,
    pub threads: i32,
    pub matmul_ok: bool,
}

/// The device quad uses: the first CUDA device when there is one, else the CPU.
pub fn default_device() -> Device {
    Device::cuda_if_available()
}

/// The libtorch shared library this process actually loaded.
fn loaded_libtorch() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("libtorch_cpu.so"))
        .map(str::to_string)
}

pub fn report() -> Result<DoctorReport> {
    let device = default_device();
    // A small product checked against its known value proves the device computes.
    let a = Tensor::arange(6, (Kind::Float, device)).reshape([2, 3]);
    let product = a.matmul(&a.transpose(0, 1)).to_device(Device::Cpu);
    let expected = Tensor::from_slice(&[5f32, 14., 14., 50.]).reshape([2, 2]);
    let matmul_ok = product.allclose(&expected, 1e-5, 1e-6, false);
    Ok(DoctorReport {
        libtorch_version: env!("QUAD_LIBTORCH_VERSION"),
        libtorch_path: loaded_libtorch(),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        device,
        threads: tch::get_num_threads(),
        matmul_ok,
    })
}

impl std::fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "quad {}", env!("CARGO_PKG_VERSION"))?;
        writeln!(f, "libtorch        {}", self.libtorch_version)?;
        writeln!(
            f,
            "libtorch path   {}",
            self.libtorch_path
                .as_deref()
                .unwrap_or("(not found in /proc/self/maps)")
        )?;
        writeln!(
            f,
            "cuda available  {} ({} device(s), cudnn {})",
            self.cuda_available, self.cuda_devices, self.cudnn_available
        )?;
        writeln!(f, "device          {:?}", self.device)?;
        writeln!(f, "cpu threads     {}", self.threads)?;
        write!(
            f,
            "matmul check    {}",
            if self.matmul_ok { "ok" } else { "FAILED" }
        )
    }
}
