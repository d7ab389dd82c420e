//! What the app can open and the way back to it: an [`Item`] names one thing a view shows (a
//! feature of a dictionary, an attention head, a node of a circuit or of an attribution graph, an
//! expert), and [`History`] is the back/forward list over the items opened.

/// One thing the user can open, link to and go back to. A view asks for one by putting it in
/// [`super::view::ViewContext::open`]; the app opens it after the frame (switching the view and,
/// when the item belongs to another dictionary, the dictionary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Feature `feature` of the analysed dictionary `dictionary`: its page.
    Feature { dictionary: String, feature: u32 },
    /// Attention head `layer.head` of the store's model: its page in the Heads view.
    Head { layer: usize, head: usize },
    /// Node `node` (`L.H` or `L.mlp`) of the store's circuit `circuit`: selected in the Circuits
    /// view, with that circuit shown.
    CircuitNode { circuit: String, node: String },
    /// Node `node` (its `node_id`, e.g. `3_1024_5`) of the store's attribution graph `graph`:
    /// selected in the Graph view, with that graph shown.
    GraphNode { graph: String, node: String },
    /// Expert `expert` of the store's experts entry `source`: selected in the Experts view, with
    /// that entry shown.
    Expert { source: String, expert: u32 },
}

impl Item {
    /// The dictionary the item belongs to (the app loads it to show the item); None for items
    /// of the model (heads).
    pub fn dictionary(&self) -> Option<&str> {
        match self {
            Item::Feature { dictionary, .. } => Some(dictionary),
            Item::Head { .. } | Item::CircuitNode { .. } | Item::GraphNode { .. } | Item::Expert { .. } => {
                None
            }
        }
    }
}

/// Back/forward over the items opened, as in a web browser: opening an item drops the forward
/// list; reopening the current one adds nothing.
#[derive(Debug)]
pub struct History<T> {
    back: Vec<T>,
    current: Option<T>,
    forward: Vec<T>,
}

impl<T> Default for History<T> {
    fn default() -> Self {
        History { back: Vec::new(), current: None, forward: Vec::new() }
    }
}

impl<T: PartialEq> History<T> {
    /// The item shown now, if any.
    pub fn current(&self) -> Option<&T> {
        self.current.as_ref()
    }

    pub fn open(&mut self, item: T) {
        if self.current.as_ref() == Some(&item) {
            return;
        }
        self.back.extend(self.current.take());
        self.current = Some(item);
        self.forward.clear();
    }

    /// Show nothing (the current item stays one step back).
    pub fn close(&mut self) {
        self.back.extend(self.current.take());
        self.forward.clear();
    }

    pub fn can_go_back(&self) -> bool {
        !self.back.is_empty()
    }

    pub fn can_go_forward(&self) -> bool {
        !self.forward.is_empty()
    }

    pub fn back(&mut self) {
        if let Some(item) = self.back.pop() {
            self.forward.extend(self.current.replace(item));
        }
    }

    pub fn forward(&mut self) {
        if let Some(item) = self.forward.pop() {
            self.back.extend(self.current.replace(item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{History, Item};

    #[test]
    fn history_goes_back_and_forward_and_a_new_page_drops_the_forward_list() {
        let mut h = History::default();
        for f in [1, 2, 2, 3] {
            h.open(f);
        }
        assert_eq!(
            (h.back.clone(), h.current),
            (vec![1, 2], Some(3)),
            "reopening the current page adds nothing"
        );
        h.back();
        h.back();
        assert_eq!(h.current(), Some(&1));
        assert!(!h.can_go_back());
        h.back();
        assert_eq!(h.current(), Some(&1), "nothing before the first page");
        h.forward();
        assert_eq!(h.current(), Some(&2));
        h.open(5);
        assert!(!h.can_go_forward());
        h.back();
        assert_eq!(h.current(), Some(&2));
    }

    #[test]
    fn a_closed_item_is_one_step_back() {
        let feature = |dictionary: &str, feature| Item::Feature { dictionary: dictionary.into(), feature };
        let mut h = History::default();
        h.open(feature("a", 3));
        h.close();
        assert_eq!(h.current(), None);
        h.back();
        assert_eq!(h.current(), Some(&feature("a", 3)));
        assert_eq!(h.current().unwrap().dictionary(), Some("a"));
        assert_eq!(Item::Head { layer: 1, head: 2 }.dictionary(), None);
        assert_eq!(Item::Expert { source: "monet".into(), expert: 3 }.dictionary(), None);
        assert_eq!(
            Item::CircuitNode { circuit: "ioi-patching".into(), node: "5.mlp".into() }.dictionary(),
            None
        );
        assert!(!h.can_go_forward(), "nothing to go forward to: the closed state is not kept");
        h.open(feature("b", 3));
        h.back();
        assert_eq!(h.current(), Some(&feature("a", 3)), "items of other dictionaries are other items");
    }
}
