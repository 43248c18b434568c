//! The Hugging Face Hub client, shared by pretrained models (`models::pretrained`) and Hub
//! datasets (`data::hub`): the cache on disk in `huggingface_hub`'s layout ([`cache`]), HTTP with
//! connect and read timeouts ([`http`]), one repository's files through the cache first
//! ([`repo`]), and the parquet files of a dataset split ([`datasets`]).

pub mod cache;
pub mod datasets;
pub mod http;
pub mod repo;

pub use cache::{hub_cache_dir, RepoKind};
pub use datasets::{download_dataset_files, hub_dataset_files, resolve_dataset_files, resolve_dataset_files_in};
pub use http::Timeouts;
pub use repo::{HubOptions, HubRepo, Lookup, TreeEntry};
