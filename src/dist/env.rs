//! [`Topology`]: this process's place among the ranks a launcher started, read from the
//! variables the launcher sets (Open MPI's `mpirun`, a PMI launcher such as Slurm's `srun
//! --mpi=pmix` or MPICH's Hydra, or torchrun-style `RANK`/`WORLD_SIZE`).

/// Where this process stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// This process's rank, `0..size`.
    pub rank: usize,
    /// How many processes the launcher started.
    pub size: usize,
    /// The rank among the processes on this machine (the GPU a rank takes).
    pub local_rank: usize,
    /// How many processes run on this machine (they share its cores).
    pub local_size: usize,
    /// What started the processes, in words (`mpirun`, `a PMI launcher`, `RANK/WORLD_SIZE`).
    pub launcher: &'static str,
    /// A name for this launch that every rank reads alike (for meeting through a file).
    pub job: Option<String>,
}

impl Default for Topology {
    fn default() -> Self {
        Self { rank: 0, size: 1, local_rank: 0, local_size: 1, launcher: "none", job: None }
    }
}

/// The launchers' variables: rank, size, local rank, local size.
const LAUNCHERS: [(&str, [&str; 4]); 3] = [
    (
        "mpirun",
        ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"],
    ),
    ("a PMI launcher", ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"]),
    ("RANK/WORLD_SIZE", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"]),
];

impl Topology {
    /// The topology the environment describes; one process alone when no launcher set it.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Topology::from_env`] over any source of variables (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
        for (launcher, [rank, size, local_rank, local_size]) in LAUNCHERS {
            let (Some(r), Some(n)) = (num(rank), num(size)) else { continue };
            if n == 0 || r >= n {
                continue;
            }
            let job =
                ["PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_PORT"]
                    .iter()
                    .find_map(|k| get(k).filter(|v| !v.is_empty()));
            return Self {
                rank: r,
                size: n,
                local_rank: num(local_rank).unwrap_or(r),
                local_size: num(local_size).unwrap_or(n).max(1),
                launcher,
                job,
            };
        }
        Self::default()
    }

    /// The threads each rank computes with when the user set none: this machine's cores shared
    /// among the ranks on it.
    pub fn threads_per_rank(&self, cores: usize) -> usize {
        (cores / self.local_size.max(1)).max(1)
    }
}

/// Before any thread pool exists: gives each of several ranks on one machine its share of the
/// cores (`RAYON_NUM_THREADS`), unless the user set it.
pub fn share_cores() {
    let topo = super::topology();
    if topo.local_size > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Called from `main` before any other thread starts.
        std::env::set_var("RAYON_NUM_THREADS", topo.threads_per_rank(cores).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn reads_mpirun_and_torchrun_variables() {
        let t = Topology::from_vars(vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("PMIX_NAMESPACE", "job7"),
        ]));
        assert_eq!((t.rank, t.size, t.local_rank, t.local_size, t.launcher), (1, 4, 1, 2, "mpirun"));
        assert_eq!(t.job.as_deref(), Some("job7"));
        assert_eq!(t.threads_per_rank(16), 8);
        let t = Topology::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "2")]));
        assert_eq!((t.rank, t.size, t.local_size), (0, 2, 2));
        assert_eq!(Topology::from_vars(vars(&[("RANK", "3"), ("WORLD_SIZE", "2")])), Topology::default());
        assert_eq!(Topology::from_vars(vars(&[])), Topology::default());
    }
}
