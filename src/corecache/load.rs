//! Loading the core cache's index at start, in the background, as the media cache does
//! (`crate::cache`'s `load.rs`): the edge answers from the first moment however many
//! responses the directory holds. A request for a URL not yet indexed reads that URL's
//! entries from their directory first ([`read_url`], through `Store::settle`); from then on
//! the loader leaves the URL to the index.
//!
//! Entries of the layout before the per-URL directories (`objects/<hh>/<id>.meta`, the id
//! unrelated to the URL) are moved into their URL's directory as they are found.

use std::cmp::Reverse;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::store::{url_dir, url_hash, url_key, Id, Meta, Store};
use crate::cache::{changed_since, wait_while_held};

/// Entries added to the index per hold of its lock, so requests are never held up long.
const BATCH: usize = 10_000;

/// The whole entries of the URL `key` on disk, oldest body first: those whose meta names the
/// URL and whose body has the recorded length. Nothing is removed here (the loader does
/// that).
pub fn read_url(store: &Store, key: &str) -> Vec<(SystemTime, Id, Meta)> {
    let hash = url_hash(key);
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(url_dir(store.dir(), &hash)) else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".meta"))
            .filter(|id| id.starts_with(&hash) && valid_id(id))
        else {
            continue;
        };
        if let Some((used, meta)) = whole(&e.path(), &store.path_of(id, "body")) {
            if url_key(&meta.host, &meta.path) == key {
                found.push((used, id.into(), meta));
            }
        }
    }
    found.sort_by_key(|(used, _, _)| *used);
    found
}

/// The meta at `meta_path` if it parses and names a scheme, and the body at `body` has its
/// length, with the body's mtime (its place in the LRU order).
fn whole(meta_path: &Path, body: &Path) -> Option<(SystemTime, Meta)> {
    let meta = read_meta(meta_path).filter(|m| m.scheme.is_some())?;
    let b = std::fs::metadata(body).ok()?;
    (b.len() == meta.len).then(|| (b.modified().unwrap_or(UNIX_EPOCH), meta))
}

fn read_meta(path: &Path) -> Option<Meta> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Walks `objects/`, drops what is not whole, and adds the rest to the index behind what
/// requests put there meanwhile; then evicts down to `max_size` and says it is done.
pub fn load(store: &Arc<Store>) {
    wait_while_held(store.dir());
    // Files take their times from a coarse clock, which may lag this one by a tick: a little
    // before now, so that no file a store writes after this is taken for an old one.
    let started = SystemTime::now() - Duration::from_secs(1);
    // Even if this thread panics, the load ends (eviction resumes, the loader's set goes).
    let finish = Finish(store);
    let mut found = walk(store, started);
    // Newest first: each is then put behind all before it, so the oldest ends up last.
    found.sort_by_key(|(used, _, _)| Reverse(*used));
    let count = found.len();
    let mut rest = found.into_iter().map(|(_, id, meta)| (id, meta)).peekable();
    while rest.peek().is_some() {
        let stray = store.add_loaded(rest.by_ref().take(BATCH));
        store.unlink(&old_strays(store, stray, started));
    }
    drop(finish);
    let (bytes, n) = store.usage();
    tracing::info!(found = count, entries = n, bytes, dir = %store.dir().display(), "core cache: index loaded");
}

/// Of the entries `add_loaded` found to be strays, those written before the load started:
/// one written since is a store under way (its files written, its index entry not yet made),
/// or one whose replacer or remover unlinks it itself.
fn old_strays(store: &Store, stray: Vec<Id>, started: SystemTime) -> Vec<Id> {
    stray
        .into_iter()
        .filter(|id| !changed_since(&store.path_of(id, "meta"), started))
        .collect()
}

/// Ends the load when dropped.
struct Finish<'a>(&'a Store);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish_loading();
    }
}

/// Whether `id` is an entry name as [`super::store::own_id`] makes them (48 lowercase hex
/// digits).
fn valid_id(id: &str) -> bool {
    id.len() == 48
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every whole entry on disk, with its body's mtime. Files changed since the load started
/// are left alone: they belong to stores running meanwhile (a meta written, its body not
/// yet renamed into place).
fn walk(store: &Store, started: SystemTime) -> Vec<(SystemTime, Id, Meta)> {
    let mut found = Vec::new();
    // Entries of a version that did not key the scheme: they answer no request now.
    let mut unkeyed = 0;
    let objects = store.dir().join("objects");
    for e in walkdir::WalkDir::new(&objects)
        .min_depth(2)
        .max_depth(3)
        .into_iter()
        .flatten()
    {
        if !e.file_type().is_file() {
            continue;
        }
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if e.depth() == 2 {
            // The old layout.
            if let Some(entry) = move_old(store, p, name) {
                found.push(entry);
            }
            continue;
        }
        if let Some(id) = name.strip_suffix(".meta").filter(|id| valid_id(id)) {
            let body = p.with_extension("body");
            match whole(p, &body) {
                // Where it is and what it names agree, as `read_url` asks (a file renamed or
                // copied by hand otherwise answers for another URL's directory).
                Some((used, meta))
                    if store.path_of(id, "meta") == p
                        && id.starts_with(&url_hash(&url_key(&meta.host, &meta.path))) =>
                {
                    found.push((used, id.into(), meta))
                }
                _ if changed_since(p, started) => {}
                _ => {
                    if read_meta(p).is_some_and(|m| m.scheme.is_none()) {
                        unkeyed += 1;
                    } else {
                        tracing::warn!(path = %p.display(), "core cache: dropping an entry with no valid meta or a body of the wrong length");
                    }
                    let _ = std::fs::remove_file(p);
                    let _ = std::fs::remove_file(&body);
                }
            }
        } else if let Some(stem) = name.strip_suffix(".body").filter(|id| valid_id(id)) {
            let meta = p.with_file_name(format!("{stem}.meta"));
            if !meta.exists() && !changed_since(p, started) {
                let _ = std::fs::remove_file(p);
            }
        } else if !changed_since(p, started) {
            // A temp file of a meta write cut by a crash, or a file that is no entry's.
            let _ = std::fs::remove_file(p);
        }
    }
    if unkeyed > 0 {
        tracing::info!(
            entries = unkeyed,
            "core cache: removed entries stored by an older version (not keyed by scheme)"
        );
    }
    found
}

/// An entry of the old layout (`objects/<hh>/<id>.meta` and `.body`), moved into its URL's
/// directory under a new id; anything else there is removed.
fn move_old(store: &Store, p: &Path, name: &str) -> Option<(SystemTime, Id, Meta)> {
    let Some(stem) = name.strip_suffix(".meta") else {
        if !name.ends_with(".body") || !p.with_extension("meta").exists() {
            let _ = std::fs::remove_file(p);
        }
        return None;
    };
    let body = p.with_file_name(format!("{stem}.body"));
    let Some((used, meta)) = whole(p, &body) else {
        let _ = std::fs::remove_file(p);
        let _ = std::fs::remove_file(&body);
        return None;
    };
    let id = store.new_id(&url_key(&meta.host, &meta.path));
    let (new_meta, new_body) = (store.path_of(&id, "meta"), store.path_of(&id, "body"));
    let moved = new_meta
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::rename(&body, &new_body))
        .and_then(|()| std::fs::rename(p, &new_meta));
    if moved.is_err() {
        for f in [p, &body, &new_body] {
            let _ = std::fs::remove_file(f);
        }
        return None;
    }
    Some((used, id, meta))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use md5::Digest;

    use super::*;
    use crate::metrics::Metrics;

    fn seed(dir: &Path, entries: &[(&str, &str)]) {
        let mut headers = http::HeaderMap::new();
        headers.insert("cache-control", "public, max-age=600".parse().unwrap());
        let entries = entries
            .iter()
            .map(|(p, b)| (p.to_string(), b.as_bytes().to_vec()));
        crate::corecache::seed(dir, "a.test", &headers, entries).unwrap();
    }

    fn wait_loaded(store: &Store) {
        let start = Instant::now();
        while store.is_loading() {
            assert!(start.elapsed() < Duration::from_secs(30), "the load ends");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A response stored through `Store::insert`: `body` under `path`.
    fn insert(store: &Store, path: &str, body: &str) -> std::io::Result<()> {
        let mut headers = http::HeaderMap::new();
        headers.insert("cache-control", "public, max-age=600".parse().unwrap());
        let mut req = http::HeaderMap::new();
        req.insert("host", "a.test".parse().unwrap());
        let preq = crate::corecache::policy::policy_request(
            crate::corecache::store::Scheme::Http,
            path,
            &req,
        );
        let now = SystemTime::now();
        let status = http::StatusCode::OK;
        let mut meta =
            crate::corecache::policy::build("a.test", path, &preq, None, status, &headers, now)
                .unwrap();
        meta.len = body.len() as u64;
        std::fs::create_dir_all(store.tmp_dir()).unwrap();
        let mut tmp = tempfile::NamedTempFile::new_in(store.tmp_dir()).unwrap();
        std::io::Write::write_all(&mut tmp, body.as_bytes()).unwrap();
        store.insert(tmp.into_temp_path(), meta, &[], Instant::now())
    }

    /// Past `MAX_VARIANTS` for one URL, the variant least recently used goes, not the oldest
    /// stored: a flood of made-up `Accept-Language` values pushes out its own variants, while
    /// the one clients keep asking for stays.
    #[test]
    fn past_max_variants_the_least_recently_used_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, Metrics::new()).unwrap();
        wait_loaded(&store);
        for i in 0..crate::corecache::MAX_VARIANTS {
            insert(&store, "/v", &format!("{i}")).unwrap();
        }
        // Most recently stored first: the last is the oldest, the one before it the next.
        let ids: Vec<_> = store
            .variants("a.test", "/v")
            .into_iter()
            .map(|e| e.id)
            .collect();
        let (oldest, second) = (ids[ids.len() - 1].clone(), ids[ids.len() - 2].clone());
        store.touch(&oldest);
        insert(&store, "/v", "new").unwrap();
        let now: Vec<_> = store
            .variants("a.test", "/v")
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(now.len(), crate::corecache::MAX_VARIANTS);
        assert!(
            now.contains(&oldest),
            "the oldest stored, used since, stays"
        );
        assert!(!now.contains(&second), "the least recently used went");
    }

    /// Nothing is evicted while the index loads, so a store that would take what is counted
    /// so far past `max_size` is not made (the disk stays bounded); once loaded, it is.
    #[test]
    fn a_store_past_max_size_while_loading_waits_for_the_load() {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), &[("/a", "aaaaaaaa")]);
        let hold = crate::cache::hold_index_load(dir.path());
        let store = Store::open(dir.path(), 8, Metrics::new()).unwrap();
        store.settle_blocking(&url_key("a.test", "/a"));
        assert_eq!(store.usage(), (8, 1));
        insert(&store, "/new", "nnnnn").unwrap();
        assert_eq!(store.usage(), (8, 1), "not stored while loading");
        assert!(read_url(&store, &url_key("a.test", "/new")).is_empty());
        drop(hold);
        wait_loaded(&store);
        insert(&store, "/new", "nnnnn").unwrap();
        assert_eq!(store.usage(), (5, 1), "stored, /a evicted");
        assert_eq!(store.variants("a.test", "/new").len(), 1);
    }

    /// The loader has indexed one of a URL's two entries when a request reads the URL: each
    /// is counted once; a URL removed meanwhile is not brought back by the loader; nothing
    /// is evicted before the end, then down to `max_size`, least recently used first.
    #[test]
    fn the_loader_and_requests_count_each_entry_once_and_undo_no_removal() {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), &[("/a", "one"), ("/b", "bbbbb"), ("/c", "cc")]);
        seed(dir.path(), &[("/a", "four")]);
        let hold = crate::cache::hold_index_load(dir.path());
        let store = Store::open(dir.path(), 8, Metrics::new()).unwrap();
        let key = url_key("a.test", "/a");
        let found = read_url(&store, &key);
        assert_eq!(found.len(), 2);
        let on_disk: Vec<_> = ["/b", "/c"]
            .iter()
            .flat_map(|p| read_url(&store, &url_key("a.test", p)))
            .collect();
        // The loader's part: the first entry of /a only.
        let (_, id, meta) = found[0].clone();
        assert!(store.add_loaded([(id, meta)].into_iter()).is_empty());
        assert_eq!(store.usage(), (found[0].2.len, 1));
        // A request reads /a: the other one joins, the first is not counted again.
        store.settle_blocking(&key);
        assert_eq!(store.usage(), (7, 2));
        store.settle_blocking(&key);
        assert_eq!(store.usage(), (7, 2));
        assert_eq!(store.variants("a.test", "/a").len(), 2);
        // /b purged before the loader reached it: found on disk, removed.
        assert_eq!(store.remove_url("a.test", "/b"), 1);
        assert_eq!(store.usage(), (7, 2));
        // The loader meets all it had found: /a skipped (indexed), /b stray, /c added.
        let again = found
            .into_iter()
            .chain(on_disk)
            .map(|(_, id, meta)| (id, meta));
        let stray = store.add_loaded(again);
        assert_eq!(stray.len(), 1);
        assert!(stray[0].starts_with(&url_hash(&url_key("a.test", "/b"))));
        // 9 bytes, over max_size 8: nothing evicted until the load ends.
        assert_eq!(store.usage(), (9, 3));
        drop(hold);
        wait_loaded(&store);
        // /c (the loader's, behind what requests used) made room.
        assert_eq!(store.usage(), (7, 2));
        assert_eq!(store.variants("a.test", "/a").len(), 2);
        assert!(store.variants("a.test", "/c").is_empty());
        let files = walkdir::WalkDir::new(dir.path().join("objects"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .count();
        assert_eq!(files, 4, "removed and evicted entries' files are gone");
    }

    /// An insert that has written its whole entry but not yet taken the index lock when the
    /// loader's walk has just seen it: `add_loaded` finds the URL settled and the entry not
    /// indexed (a stray), but its files are newer than the load's start: the loader leaves
    /// them to their writer.
    #[test]
    fn the_loader_leaves_an_entry_being_inserted_to_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let hold = crate::cache::hold_index_load(dir.path());
        let store = Store::open(dir.path(), 1 << 20, Metrics::new()).unwrap();
        let started = SystemTime::now() - Duration::from_secs(1);
        let key = url_key("a.test", "/a");
        store.settle_blocking(&key);
        seed(dir.path(), &[("/a", "new")]);
        let (_, id, meta) = read_url(&store, &key).remove(0);
        let stray = store.add_loaded([(id.clone(), meta)].into_iter());
        store.unlink(&old_strays(&store, stray, started));
        drop(hold);
        assert!(store.path_of(&id, "body").exists() && store.path_of(&id, "meta").exists());
    }

    /// A meta whose URL is not the one its name's hash says (a file copied or renamed by
    /// hand, a corrupted meta that still parses): `read_url` ignores it, and so does the
    /// loader (it would otherwise index it under the meta's URL from another directory).
    #[test]
    fn the_loader_and_read_url_agree_on_an_entry_named_for_another_url() {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), &[("/a", "aaaa")]);
        let hold = crate::cache::hold_index_load(dir.path());
        let store = Store::open(dir.path(), 1 << 20, Metrics::new()).unwrap();
        let (a, b) = (url_key("a.test", "/a"), url_key("a.test", "/b"));
        let (_, id, _) = read_url(&store, &a).remove(0);
        let other: Id = format!("{}{}", url_hash(&b), &id[32..]).into();
        std::fs::create_dir_all(store.path_of(&other, "meta").parent().unwrap()).unwrap();
        for ext in ["meta", "body"] {
            std::fs::rename(store.path_of(&id, ext), store.path_of(&other, ext)).unwrap();
        }
        assert!(read_url(&store, &a).is_empty() && read_url(&store, &b).is_empty());
        drop(hold);
        wait_loaded(&store);
        assert!(
            store.variants("a.test", "/a").is_empty(),
            "indexed under /a from /b's directory"
        );
    }

    /// An entry stored before entries were keyed by scheme (a meta without one) answers no
    /// request: `read_url` skips it, the loader removes its files.
    #[test]
    fn entries_stored_before_the_scheme_was_keyed_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), &[("/a", "aaaa"), ("/b", "bb")]);
        let hold = crate::cache::hold_index_load(dir.path());
        let store = Store::open(dir.path(), 1 << 20, Metrics::new()).unwrap();
        let a = url_key("a.test", "/a");
        let (_, id, _) = read_url(&store, &a).remove(0);
        let meta = store.path_of(&id, "meta");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        json.as_object_mut()
            .unwrap()
            .remove("scheme")
            .expect("a scheme");
        std::fs::write(&meta, serde_json::to_vec(&json).unwrap()).unwrap();
        // Written long before this run (else the loader leaves it to a store under way).
        std::fs::File::options()
            .write(true)
            .open(&meta)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        assert!(read_url(&store, &a).is_empty());
        drop(hold);
        wait_loaded(&store);
        assert!(store.variants("a.test", "/a").is_empty());
        assert_eq!(
            store.variants("a.test", "/b").len(),
            1,
            "a keyed entry stays"
        );
        for ext in ["meta", "body"] {
            assert!(!store.path_of(&id, ext).exists(), "{ext} removed");
        }
    }

    /// Entries of the layout before per-URL directories are moved into their URL's
    /// directory by the loader; one of a URL a request read meanwhile (it could not see the
    /// old file) goes instead of competing with what the request found.
    #[test]
    fn the_old_layout_is_moved_in_place_by_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        seed(dir.path(), &[("/old", "kept"), ("/read", "gone")]);
        let mut old_names = Vec::new();
        for e in walkdir::WalkDir::new(dir.path().join("objects")).min_depth(3) {
            let e = e.unwrap();
            let name = e.file_name().to_str().unwrap().to_owned();
            // objects/<hh>/<32 hex>.meta, the id unrelated to the URL's hash.
            let (stem, ext) = name.split_once('.').unwrap();
            let old = hex::encode(md5::Md5::digest(stem.as_bytes()));
            let to = dir.path().join("objects").join(&old[..2]);
            std::fs::create_dir_all(&to).unwrap();
            std::fs::rename(e.path(), to.join(format!("{old}.{ext}"))).unwrap();
            // Files of the old layout predate the start.
            std::fs::File::options()
                .write(true)
                .open(to.join(format!("{old}.{ext}")))
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(60))
                .unwrap();
            old_names.push(to.join(format!("{old}.{ext}")));
        }
        assert_eq!(old_names.len(), 4);
        // Files that are no entry's, old enough to be no store's under way: removed, and
        // the load goes on.
        let junk = dir.path().join("objects/00/00");
        std::fs::create_dir_all(&junk).unwrap();
        for name in ["x.meta", "x.body", ".tmp12345"] {
            let f = std::fs::File::create(junk.join(name)).unwrap();
            f.set_modified(UNIX_EPOCH + Duration::from_secs(1)).unwrap();
        }
        let hold = crate::cache::hold_index_load(dir.path());
        let store = Store::open(dir.path(), 1 << 20, Metrics::new()).unwrap();
        let read = url_key("a.test", "/read");
        store.settle_blocking(&read);
        assert!(store.variants("a.test", "/read").is_empty());
        drop(hold);
        wait_loaded(&store);
        assert_eq!(store.usage(), (4, 1));
        let kept = store.variants("a.test", "/old");
        assert_eq!(kept.len(), 1);
        assert!(kept[0]
            .id
            .starts_with(&url_hash(&url_key("a.test", "/old"))));
        assert_eq!(
            std::fs::read(store.path_of(&kept[0].id, "body")).unwrap(),
            b"kept"
        );
        assert!(store.variants("a.test", "/read").is_empty());
        assert!(
            old_names.iter().all(|p| !p.exists()),
            "nothing left in the old place"
        );
        let files = walkdir::WalkDir::new(dir.path().join("objects"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .count();
        assert_eq!(files, 2);
    }
}
