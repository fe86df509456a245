//! [`Mesh`]: the ranks of a group laid out on named axes (`data`, `model`, `expert`), with one
//! sub-communicator per axis (design §5). ViT-22B trains on a `data × model` mesh: the batch is
//! split over `data`, every matrix over `model` (tensor parallelism).

use crate::{Communicator, Error, Result};
use std::fmt;

/// A mesh axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    /// Data parallelism: each coordinate gets its own part of the batch.
    Data,
    /// Tensor parallelism: each coordinate holds a slice of every matrix.
    Model,
    /// Expert parallelism (V-MoE): each coordinate holds some of the experts.
    Expert,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Data => "data",
            Axis::Model => "model",
            Axis::Expert => "expert",
        })
    }
}

impl std::str::FromStr for Axis {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "data" => Ok(Axis::Data),
            "model" => Ok(Axis::Model),
            "expert" => Ok(Axis::Expert),
            _ => Err(Error::Mesh { msg: format!("unknown axis {s:?}, expected data, model or expert") }),
        }
    }
}

/// The axes and their sizes, outermost first; ranks are laid out row-major, so the last axis
/// varies fastest (`data × model` puts the model ranks of one data coordinate next to each
/// other: on one machine's NVLink, as Megatron and ViT-22B place them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshShape {
    axes: Vec<(Axis, usize)>,
}

impl MeshShape {
    /// A shape from `(axis, size)` pairs, outermost first. Each axis at most once, sizes ≥ 1.
    pub fn new(axes: &[(Axis, usize)]) -> Result<Self> {
        for (i, &(a, n)) in axes.iter().enumerate() {
            if n == 0 {
                return Err(Error::Mesh { msg: format!("axis {a} has size 0, expected at least 1") });
            }
            if axes[..i].iter().any(|&(b, _)| b == a) {
                return Err(Error::Mesh { msg: format!("axis {a} appears twice in {}", Self::describe(axes)) });
            }
        }
        Ok(MeshShape { axes: axes.to_vec() })
    }

    /// `data × model` (the ViT-22B mesh).
    pub fn data_model(data: usize, model: usize) -> Result<Self> {
        Self::new(&[(Axis::Data, data), (Axis::Model, model)])
    }

    /// Parses `data=2,model=4` (the `--mesh` syntax).
    pub fn parse(s: &str) -> Result<Self> {
        let mut axes = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, size) = part
                .split_once('=')
                .ok_or_else(|| Error::Mesh { msg: format!("expected AXIS=SIZE in {s:?}, got {part:?}") })?;
            let size = size.trim().parse::<usize>().map_err(|_| Error::Mesh {
                msg: format!("the size of axis {name} in {s:?} is {size:?}, expected a positive integer"),
            })?;
            axes.push((name.trim().parse::<Axis>()?, size));
        }
        if axes.is_empty() {
            return Err(Error::Mesh { msg: format!("expected at least one AXIS=SIZE, got {s:?}") });
        }
        Self::new(&axes)
    }

    /// The number of ranks: the product of the sizes.
    pub fn ranks(&self) -> usize {
        self.axes.iter().map(|&(_, n)| n).product()
    }

    /// The size of `axis`; 1 for an axis the mesh does not have.
    pub fn size(&self, axis: Axis) -> usize {
        self.axes.iter().find(|&&(a, _)| a == axis).map_or(1, |&(_, n)| n)
    }

    /// The axes, outermost first.
    pub fn axes(&self) -> &[(Axis, usize)] {
        &self.axes
    }

    /// The coordinates of `rank`, one per axis in [`MeshShape::axes`] order.
    pub fn coords(&self, rank: usize) -> Vec<usize> {
        let mut rest = rank;
        let mut c = vec![0; self.axes.len()];
        for (i, &(_, n)) in self.axes.iter().enumerate().rev() {
            c[i] = rest % n;
            rest /= n;
        }
        c
    }

    fn describe(axes: &[(Axis, usize)]) -> String {
        axes.iter().map(|(a, n)| format!("{a}={n}")).collect::<Vec<_>>().join(",")
    }
}

impl fmt::Display for MeshShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Self::describe(&self.axes))
    }
}

/// One rank's view of a mesh: its coordinates and a communicator per axis, whose group is
/// the ranks that share every other coordinate (ranked by their coordinate on the axis).
pub struct Mesh {
    shape: MeshShape,
    rank: usize,
    coords: Vec<usize>,
    groups: Vec<Box<dyn Communicator>>,
}

impl fmt::Debug for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("shape", &self.shape)
            .field("rank", &self.rank)
            .field("coords", &self.coords)
            .finish()
    }
}

impl Mesh {
    /// Lays out the ranks of `world` on `shape` (a collective: every rank of `world` calls it).
    /// The world size must equal the product of the axis sizes.
    pub fn new(world: &dyn Communicator, shape: MeshShape) -> Result<Self> {
        if shape.ranks() != world.world_size() {
            return Err(Error::Mesh {
                msg: format!(
                    "mesh {shape} has {} ranks, but the world has {} (expected the product of the axis sizes)",
                    shape.ranks(),
                    world.world_size()
                ),
            });
        }
        let rank = world.rank();
        let coords = shape.coords(rank);
        let mut groups = Vec::with_capacity(coords.len());
        for i in 0..coords.len() {
            // Color: this rank's coordinates on the other axes, row-major; key: its coordinate here.
            let color = shape
                .axes
                .iter()
                .zip(&coords)
                .enumerate()
                .filter(|&(j, _)| j != i)
                .fold(0, |acc, (_, (&(_, n), &c))| acc * n + c);
            groups.push(world.split(color, coords[i])?);
        }
        Ok(Mesh { shape, rank, coords, groups })
    }

    /// The mesh's shape.
    pub fn shape(&self) -> &MeshShape {
        &self.shape
    }

    /// This rank in the whole mesh.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The size of `axis` (1 if the mesh does not have it).
    pub fn size(&self, axis: Axis) -> usize {
        self.shape.size(axis)
    }

    /// This rank's coordinate on `axis` (0 if the mesh does not have it).
    pub fn coord(&self, axis: Axis) -> usize {
        self.index(axis).map_or(0, |i| self.coords[i])
    }

    /// The communicator of `axis`: the ranks that share this rank's other coordinates; its
    /// rank is [`Mesh::coord`]. `None` if the mesh does not have the axis.
    pub fn axis(&self, axis: Axis) -> Option<&dyn Communicator> {
        self.index(axis).map(|i| self.groups[i].as_ref())
    }

    fn index(&self, axis: Axis) -> Option<usize> {
        self.shape.axes.iter().position(|&(a, _)| a == axis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_lay_out_row_major_and_reject_bad_input() {
        let s = MeshShape::parse("data=2, model=3").unwrap();
        assert_eq!((s.ranks(), s.size(Axis::Data), s.size(Axis::Model), s.size(Axis::Expert)), (6, 2, 3, 1));
        assert_eq!(s.coords(4), vec![1, 1]);
        assert_eq!(s.coords(2), vec![0, 2]);
        assert_eq!(s.to_string(), "data=2,model=3");
        for (bad, says) in [
            ("data=2,data=2", "appears twice"),
            ("data=0", "size 0"),
            ("pipeline=2", "unknown axis \"pipeline\""),
            ("data=two", "\"two\""),
            ("data", "AXIS=SIZE"),
            ("", "at least one"),
        ] {
            let e = MeshShape::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
