//! The names the share has handed out: every file id a guest holds stands for
//! a (directory id, name) pair this server made, so a handle names nothing
//! but a path it was given under an exported directory. A guest that makes up
//! an id gets "stale", never a file outside the share.

use std::collections::HashMap;

/// The id of the list of exports (what `mount SERVER:/` would show).
pub const ROOT: u64 = 1;

#[derive(Debug, Clone)]
struct Node {
    parent: u64,
    name: Box<[u8]>,
    /// The export it is under.
    export: usize,
}

/// Ids to names and back.
#[derive(Debug)]
pub struct Tree {
    nodes: HashMap<u64, Node>,
    children: HashMap<(u64, Box<[u8]>), u64>,
    next: u64,
}

/// Where an id is: its export and the names from the export's directory down
/// (none for the export's directory itself).
#[derive(Debug, PartialEq, Eq)]
pub struct Place {
    pub export: usize,
    pub path: Vec<Box<[u8]>>,
}

impl Tree {
    /// A tree with the exports' directories, named `names`, under [`ROOT`]:
    /// export `i` has id `i + 2`.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Tree {
        let mut t = Tree { nodes: HashMap::new(), children: HashMap::new(), next: ROOT + 1 };
        for (export, name) in names.into_iter().enumerate() {
            t.insert(ROOT, name.as_bytes(), export);
        }
        t
    }

    fn insert(&mut self, parent: u64, name: &[u8], export: usize) -> u64 {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(id, Node { parent, name: name.into(), export });
        self.children.insert((parent, name.into()), id);
        id
    }

    /// The export whose directory `id` is, if it is one.
    pub fn export_root(&self, id: u64) -> Option<usize> {
        self.nodes.get(&id).filter(|n| n.parent == ROOT).map(|n| n.export)
    }

    /// The id of `name` in the directory `dir` (made now if new), or None
    /// if `dir` is not an id this tree gave out.
    pub fn child(&mut self, dir: u64, name: &[u8]) -> Option<u64> {
        if let Some(&id) = self.children.get(&(dir, Box::from(name))) {
            return Some(id);
        }
        let export = self.nodes.get(&dir)?.export;
        // Under the root only the exports exist; they were made with the tree.
        (dir != ROOT).then(|| self.insert(dir, name, export))
    }

    /// The id's directory ([`ROOT`] for an export's, and for the root).
    pub fn parent(&self, id: u64) -> Option<u64> {
        if id == ROOT {
            return Some(ROOT);
        }
        self.nodes.get(&id).map(|n| if n.parent == ROOT { id } else { n.parent })
    }

    /// Where `id` is, or None for an id this tree never gave out or has forgotten.
    pub fn place(&self, id: u64) -> Option<Place> {
        let mut path = Vec::new();
        let mut at = self.nodes.get(&id)?;
        let export = at.export;
        while at.parent != ROOT {
            path.push(at.name.clone());
            at = self.nodes.get(&at.parent)?;
        }
        path.reverse();
        Some(Place { export, path })
    }

    /// `name` in `dir` is gone: its id (and any under it) name nothing now.
    pub fn forget(&mut self, dir: u64, name: &[u8]) {
        if let Some(id) = self.children.remove(&(dir, Box::from(name))) {
            self.nodes.remove(&id);
            // Ids under it stay until they are looked at: place() no longer
            // reaches an export from them, so they answer stale.
        }
    }

    /// `name` in `from` is now `to_name` in `to` (whatever was there is gone).
    pub fn rename(&mut self, from: u64, name: &[u8], to: u64, to_name: &[u8]) {
        self.forget(to, to_name);
        if let Some(id) = self.children.remove(&(from, Box::from(name))) {
            let node = self.nodes.get_mut(&id).expect("children and nodes agree");
            node.parent = to;
            node.name = to_name.into();
            self.children.insert((to, to_name.into()), id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_paths_under_their_export() {
        let mut t = Tree::new(["data", "logs"]);
        assert_eq!(t.child(ROOT, b"data"), Some(2));
        assert_eq!(t.child(ROOT, b"logs"), Some(3));
        assert_eq!(t.child(ROOT, b"etc"), None, "nothing but the exports under the root");
        assert_eq!(t.export_root(3), Some(1));
        let a = t.child(2, b"a").unwrap();
        let b = t.child(a, b"b").unwrap();
        assert_eq!(t.child(a, b"b"), Some(b), "the same name keeps its id");
        assert_eq!(t.place(b), Some(Place { export: 0, path: vec![b"a".as_slice().into(), b"b".as_slice().into()] }));
        assert_eq!(t.place(2), Some(Place { export: 0, path: vec![] }));
        assert_eq!(t.parent(b), Some(a));
        assert_eq!(t.parent(2), Some(2), "an export's .. is itself");
        assert_eq!(t.place(9999), None);
        assert_eq!(t.child(9999, b"x"), None, "a made-up directory id names nothing");
    }

    #[test]
    fn renames_carry_what_is_under_them_and_removals_go_stale() {
        let mut t = Tree::new(["data"]);
        let dir = t.child(2, b"dir").unwrap();
        let f = t.child(dir, b"f").unwrap();
        let other = t.child(2, b"other").unwrap();
        t.rename(2, b"dir", other, b"moved");
        assert_eq!(t.place(f).unwrap().path, vec![Box::from(&b"other"[..]), Box::from(&b"moved"[..]), Box::from(&b"f"[..])]);
        t.forget(other, b"moved");
        assert_eq!(t.place(f), None, "under a removed directory: stale");
        assert_eq!(t.place(dir), None);
        let g = t.child(2, b"g").unwrap();
        let h = t.child(2, b"h").unwrap();
        t.rename(2, b"g", 2, b"h");
        assert_eq!(t.place(h), None, "the file renamed over is gone");
        assert_eq!(t.place(g).unwrap().path, vec![Box::from(&b"h"[..])]);
        assert_eq!(t.child(2, b"h"), Some(g));
    }
}
