//! Sections 2 and 3: every reference fixture through parity on the GPU, and tp = 2 on one GPU.

use super::*;

type Tp2Errors = ([f64; 3], String);
/// One tp rank's results: (tp_index, logits, logits columns, loss, gradients).
type Tp2Rank = (usize, Vec<f32>, (usize, usize, usize), f32, Vec<Vec<f32>>);

/// Forward, loss and backward of fixture `dir` on two tensor-parallel ranks, each on a backend
/// from `make_backend` (on the GPU check: two CUDA backends sharing one GPU); `None` when the
/// fixture's config or batch does not admit tp = 2. Returns the loss (abs), logits (max abs) and
/// gradient (max relative to each tensor's max) errors.
pub(super) fn tp2_fixture<B: Backend>(
    make_backend: impl Fn() -> dm_runtime::Result<B> + Sync,
    dir: &Path,
) -> Result<Option<Tp2Errors>> {
    let cfg = DalleBartConfig::from_file(&dir.join("config.json"))?;
    let batch = crate::parity::read_batch(&dir.join("batch.safetensors"), &cfg)?;
    if crate::parity::check_mesh(&cfg, batch.batch, 2, 1).is_err() {
        return Ok(None);
    }
    let full = ParamTable::new(&cfg);
    // weights.safetensors or a dalle-mini flax_model.msgpack, through the loader parity uses.
    let weights = dm_model::dalle_mini::load_model_weights(dir, &full)?;
    let expected_path = dir.join("expected.safetensors");
    let expected = read_tensors(&expected_path)?;
    let f32_of = |name: &str| -> Result<Vec<f32>> {
        match expected.get(name) {
            Some(HostTensor::F32 { data, .. }) => Ok(data.clone()),
            _ => anyhow::bail!("{}: float tensor `{name}` is missing", expected_path.display()),
        }
    };
    let (ref_logits, ref_loss) = (f32_of("logits")?, f32_of("loss")?[0] as f64);
    let ref_grads = params_from_tensors(&expected_path, &full, &expected, "grad.")?;
    let tokens = (batch.batch * batch.image_len) as f32;
    let mesh = Mesh::new(2, 1)?;
    let results = run_ranks(&mesh, |rank, comms| -> Result<Tp2Rank> {
        let (_, tp_index) = mesh.coords(rank);
        let be = make_backend()?;
        let table = ParamTable::sharded(&cfg, tp_index, 2);
        let local = table.shard_values(&weights);
        let comm: Arc<dyn Communicator<B>> = Arc::new(HostStagedComm::new(comms.tp, be.clone()));
        let group = TpGroup { rank: tp_index, size: 2, comm };
        let mut model = DalleBart::new_sharded(be, cfg.clone(), Some(group), local)?;
        model.forward(&batch)?;
        let logits = model.logits()?;
        let cols = model.logits_columns();
        let out = model.loss_and_backward(1.0 / tokens)?;
        Ok((tp_index, logits, cols, out.loss, model.grad_values()?))
    })
    .map_err(|f| anyhow::anyhow!("{f}"))?;
    let classes = cfg.loss_classes();
    let rows = batch.batch * batch.image_len;
    let mut logits = vec![f32::NAN; ref_logits.len()];
    for (_, l, (cols, start, valid), _, _) in &results {
        for i in 0..rows {
            logits[i * classes + start..i * classes + start + valid].copy_from_slice(&l[i * cols..i * cols + valid]);
        }
    }
    let mut by_tp: Vec<_> = results.iter().collect();
    by_tp.sort_by_key(|r| r.0);
    let tables: Vec<ParamTable> = (0..2).map(|t| ParamTable::sharded(&cfg, t, 2)).collect();
    let locals: Vec<Vec<Vec<f32>>> = by_tp.iter().map(|r| r.4.clone()).collect();
    let grads = ParamTable::unshard_values(&tables, &locals);
    let mut worst = (0.0f64, String::new());
    for ((spec, g), r) in full.specs.iter().zip(&grads).zip(&ref_grads) {
        let e = rel_err(g, r);
        if e >= worst.0 {
            worst = (e, spec.name.clone());
        }
    }
    let loss_err = (by_tp[0].3 as f64 - ref_loss).abs();
    let logits_err = logits
        .iter()
        .zip(&ref_logits)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, |m: f64, x| if x.is_nan() { f64::INFINITY } else { m.max(x) });
    let detail = format!("loss {loss_err:.1e} logits {logits_err:.1e} grad {:.1e} ({})", worst.0, worst.1);
    Ok(Some(([loss_err, logits_err, worst.0], detail)))
}

impl Checker<CudaBackend> {
    // ---- section 2: parity fixtures --------------------------------------------------------------

    pub(super) fn parity(&mut self, dir: &Path) -> Result<()> {
        for f in fixture_dirs(dir)? {
            let name = f.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            for (label, be) in [
                ("f32 custom", self.gpu.with_options(Precision::F32, MatmulImpl::Custom)),
                ("f32 cublas", self.gpu.with_options(Precision::F32, MatmulImpl::Cublas)),
            ] {
                match crate::parity::run_on(be, &f) {
                    Ok(r) => {
                        let detail = format!(
                            "loss {:.1e} logits {:.1e} grad {:.1e} ({}) adamw {:.1e}/{:.1e}",
                            r.loss_abs_err,
                            r.logits_max_abs_err,
                            r.grad_max_rel_err,
                            r.grad_worst_param,
                            r.adamw_from_ref_grads_max_abs_err,
                            r.adamw_max_abs_err
                        );
                        let st = if r.pass { Status::Pass } else { Status::Fail };
                        self.row(
                            "parity",
                            &format!("{name} ({label})"),
                            st,
                            Some(r.grad_max_rel_err),
                            Some(crate::parity::GRAD_REL_TOL),
                            detail,
                        );
                    }
                    Err(e) => {
                        self.row("parity", &format!("{name} ({label})"), Status::Fail, None, None, format!("{e:#}"))
                    }
                }
            }
        }
        Ok(())
    }

    // ---- section 3: tp = 2 on one GPU ---------------------------------------------------------

    pub(super) fn tp2(&mut self, dir: &Path) -> Result<()> {
        let ordinal = self.gpu.info().ordinal;
        for f in fixture_dirs(dir)? {
            let name = format!(
                "tp=2 {} (f32 custom)",
                f.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            );
            match tp2_fixture(|| CudaBackend::new(ordinal, CudaOptions::default()), &f) {
                Ok(None) => {
                    self.row("tp", &name, Status::Skipped, None, None, "the fixture does not admit tp=2".into())
                }
                Ok(Some((errs, detail))) => {
                    let [loss, logits, grad] = errs;
                    let pass = loss <= crate::parity::LOSS_TOL
                        && logits <= crate::parity::LOGITS_TOL
                        && grad <= crate::parity::GRAD_REL_TOL;
                    let st = if pass { Status::Pass } else { Status::Fail };
                    self.row("tp", &name, st, Some(grad), Some(crate::parity::GRAD_REL_TOL), detail);
                }
                Err(e) => self.row("tp", &name, Status::Fail, None, None, format!("{e:#}")),
            }
        }
        Ok(())
    }
}
