//! A training run's files in `dictionaries/<name>/`: which files a run of a [`Fit`] writes (its
//! final files, and each checkpoint's under `checkpoints/step-N/`), and the clean-up after a
//! commit, which removes the checkpoints the manifest no longer lists, file by file, and only
//! files a run writes (never a folder's other content, never `remove_dir_all`).

use std::path::Path;

use anyhow::Result;

use super::job::Fit;

/// After a commit: remove the checkpoints the manifest no longer lists (all but `keep`), file by
/// file — only the files a checkpoint holds, never a folder's other content.
pub(crate) fn remove_old_checkpoints<F: Fit>(root: &Path, keep: Option<&str>) -> Result<()> {
    let old: Vec<String> = loupe_store::fsutil::files_under(&root.join("checkpoints"))?
        .into_iter()
        .map(|f| format!("checkpoints/{f}"))
        .filter(|f| is_run_file::<F>(f) && keep.is_none_or(|k| !f.starts_with(&format!("{k}/"))))
        .collect();
    let refs: Vec<&str> = old.iter().map(String::as_str).collect();
    loupe_store::fsutil::remove_files(root, &refs)?;
    // Folders a killed checkpoint left empty (its `.tmp` files were removed when the store was
    // opened); `remove_dir` takes only empty ones.
    let checkpoints = root.join("checkpoints");
    for step in std::fs::read_dir(&checkpoints).into_iter().flatten().flatten() {
        if keep.is_none_or(|k| step.path() != root.join(k)) {
            let _ = std::fs::remove_dir(step.path());
        }
    }
    let _ = std::fs::remove_dir(checkpoints);
    Ok(())
}

/// Whether `file` (relative to a dictionary's folder) is one a training run of `F` writes: its
/// final files, or a checkpoint's files under `checkpoints/step-N/`.
pub(crate) fn is_run_file<F: Fit>(file: &str) -> bool {
    let known = |name: &str| {
        F::CHECKPOINT_FILES
            .iter()
            .chain(F::FINAL_FILES)
            .chain(&["train_log.arrow", "eval.json"])
            .any(|f| *f == name)
    };
    match file.split('/').collect::<Vec<_>>()[..] {
        [name] => known(name),
        ["checkpoints", step, name] => step.starts_with("step-") && known(name),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Trainer;

    #[test]
    fn run_files_are_known_by_name_and_place() {
        let yes = ["cfg.json", "eval.json", "train_log.arrow", "checkpoints/step-00000010/state.json"];
        let no = ["notes.txt", "checkpoints/state.json", "checkpoints/old/cfg.json", "a/b/cfg.json"];
        assert!(yes.iter().all(|f| is_run_file::<Trainer>(f)));
        assert!(!no.iter().any(|f| is_run_file::<Trainer>(f)));
    }

    /// Old checkpoints go, the kept one and a stranger's file stay; emptied folders go too.
    #[test]
    fn clean_up_removes_only_unlisted_checkpoint_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for step in ["step-00000010", "step-00000020", "step-00000030"] {
            std::fs::create_dir_all(root.join("checkpoints").join(step)).unwrap();
            std::fs::write(root.join("checkpoints").join(step).join("state.json"), "{}").unwrap();
        }
        std::fs::write(root.join("checkpoints/step-00000010/mine.txt"), "keep me").unwrap();
        std::fs::create_dir_all(root.join("checkpoints/step-00000040")).unwrap(); // a kill left it empty
        remove_old_checkpoints::<Trainer>(root, Some("checkpoints/step-00000030")).unwrap();
        assert!(root.join("checkpoints/step-00000030/state.json").exists());
        assert!(root.join("checkpoints/step-00000010/mine.txt").exists());
        assert!(!root.join("checkpoints/step-00000010/state.json").exists());
        assert!(!root.join("checkpoints/step-00000020").exists());
        assert!(!root.join("checkpoints/step-00000040").exists());
        std::fs::remove_file(root.join("checkpoints/step-00000010/mine.txt")).unwrap();
        remove_old_checkpoints::<Trainer>(root, None).unwrap();
        assert!(!root.join("checkpoints").exists());
    }
}
