//! One way to declare a store table: `table!` turns one field list into the row struct, its
//! Arrow schema ([`schema`]), its writer ([`batch`]: rows to a record batch) and its typed
//! reader (a struct of zero-copy column views over a mapped batch, with `row(i)`).
//!
//! Each field's type says how it is stored ([`Columns`]): `u8`..`u64`, `i8`, `f32`, `bool` and
//! `String` as one non-null column; `Option<String>` and `Option<f32>` as one nullable column;
//! `Vec<u32|u64|f32>` as a `List` (items named `item`, nullable, as arrow's `ListBuilder` makes
//! them); and a type declared with `table!` as its own columns, flattened into its container
//! (how [`crate::Explanation`] and [`crate::Score`] share [`crate::explanations::Provenance`]).
//! `as "name"` stores a field under another column name.
//!
//! Why a macro and not `serde_arrow` (which does support arrow 60 through its `arrow-60`
//! feature): serde_arrow deserializes whole rows into owned values, while the feature tables are
//! read by memory-mapping the IPC file and viewing columns in place (`&[f32]` of all densities,
//! the rows of one feature at a time); and its traced schemas differ from the files already
//! written (`LargeUtf8`, `LargeList` with items named `element`), so every table would need its
//! schema written out by hand again.

use std::sync::Arc;

use anyhow::{Result, bail};
use arrow_array::builder::{ListBuilder, PrimitiveBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Float32Type, Int8Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, BooleanArray, Float32Array, PrimitiveArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

/// A value stored as one or more Arrow columns of a table.
pub trait Columns: Sized {
    /// A zero-copy view of the stored columns (slices and arrays borrowed from a batch).
    type View<'a>: Copy;

    /// Append the fields. `name` is the field's name in the containing row: a single column is
    /// stored under it; a row type (flattened into its container) uses its own fields' names.
    fn fields(name: &'static str, out: &mut Vec<Field>);

    /// Append the arrays of `rows`, one per field of [`Columns::fields`].
    fn arrays<'a, I>(rows: I, out: &mut Vec<ArrayRef>)
    where
        I: Iterator<Item = &'a Self> + Clone,
        Self: 'a;

    /// View the next columns of `columns`, which must have the types of [`Columns::fields`]
    /// (a batch whose schema was checked against [`schema`]).
    fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> Self::View<'a>;

    /// Row `i` of a view.
    fn get(view: &Self::View<'_>, i: usize) -> Self;
}

/// The schema of a table of `T` rows.
pub fn schema<T: Columns>() -> SchemaRef {
    Arc::new(Schema::new(fields::<T>()))
}

/// The fields of a table of `T` rows.
pub fn fields<T: Columns>() -> Vec<Field> {
    let mut out = Vec::new();
    T::fields("", &mut out);
    out
}

/// The arrays of `rows`, in [`fields`] order.
pub fn arrays<T: Columns>(rows: &[T]) -> Vec<ArrayRef> {
    let mut out = Vec::new();
    T::arrays(rows.iter(), &mut out);
    out
}

/// `rows` as one record batch with the [`schema`] of `T`.
pub fn batch<T: Columns>(rows: &[T]) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(schema::<T>(), arrays(rows))?)
}

/// The column views of `batch`, checked against the [`schema`] of `T` first.
pub fn view<T: Columns>(batch: &RecordBatch) -> Result<T::View<'_>> {
    if batch.schema().fields() != schema::<T>().fields() {
        bail!("the table does not have the expected schema");
    }
    Ok(T::view(&mut batch.columns().iter()))
}

/// `batch` as the bytes of an Arrow IPC file.
pub fn ipc_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut writer = arrow_ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(bytes)
}

/// An Arrow IPC file written a record batch at a time, atomically: the batches go to a
/// temporary file, which [`StreamWriter::finish`] fsyncs and renames into place (so a kill leaves
/// only a `.tmp` leftover that the next listing sweeps).
pub struct StreamWriter {
    path: std::path::PathBuf,
    writer: arrow_ipc::writer::FileWriter<std::io::BufWriter<std::fs::File>>,
}

impl StreamWriter {
    /// Start the file `path` (written as `path` + `.tmp` until finished) of tables of `schema`.
    pub fn create(path: &std::path::Path, schema: SchemaRef) -> Result<StreamWriter> {
        use anyhow::Context;
        crate::fsutil::crash_point();
        let tmp = crate::fsutil::tmp_path(path);
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let writer = arrow_ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema)?;
        Ok(StreamWriter { path: path.to_path_buf(), writer })
    }

    /// Append one record batch (an empty one is skipped).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        use anyhow::Context;
        if batch.num_rows() > 0 {
            self.writer.write(batch).with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        Ok(())
    }

    /// Close the file, fsync it and move it to its final name.
    pub fn finish(mut self) -> Result<()> {
        use anyhow::Context;
        let tmp = crate::fsutil::tmp_path(&self.path);
        self.writer.finish().with_context(|| format!("cannot write {}", tmp.display()))?;
        let file = self.writer.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all().with_context(|| format!("cannot fsync {}", tmp.display()))?;
        crate::fsutil::commit_tmp(&tmp, &self.path)
    }
}

fn next<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> &'a ArrayRef {
    columns.next().expect("the schema was checked: one array per field")
}

/// Declare a table row: the struct, and its [`Columns`] implementation with a view struct.
///
/// ```ignore
/// table! {
///     /// One row of `logits.arrow`.
///     #[derive(Clone, Debug)]
///     pub struct LogitEffect, view LogitColumns {
///         pub feature_id: u32,
///         pub rank: i8,
///     }
///     // Optional: fields kept in the struct but not stored in its columns (default on read).
///     not stored { pub note: Option<String> }
/// }
/// ```
macro_rules! table {
    (@column $field:ident) => { stringify!($field) };
    (@column $field:ident $column:literal) => { $column };
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident, view $view:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty $(as $column:literal)? ),* $(,)?
        }
        $( not stored { $( $(#[$xmeta:meta])* $xvis:vis $xfield:ident : $xty:ty ),* $(,)? } )?
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
            $($( $(#[$xmeta])* $xvis $xfield: $xty, )*)?
        }

        #[doc = concat!("Zero-copy views of the columns of a table of [`", stringify!($name), "`] rows.")]
        #[derive(Clone, Copy)]
        $vis struct $view<'a> {
            $( pub $field: <$ty as $crate::table::Columns>::View<'a>, )*
        }

        impl $view<'_> {
            /// Row `i`, owned.
            pub fn row(&self, i: usize) -> $name {
                $name {
                    $( $field: <$ty as $crate::table::Columns>::get(&self.$field, i), )*
                    $($( $xfield: Default::default(), )*)?
                }
            }
        }

        impl $crate::table::Columns for $name {
            type View<'a> = $view<'a>;

            fn fields(_name: &'static str, out: &mut Vec<arrow_schema::Field>) {
                $( <$ty as $crate::table::Columns>::fields($crate::table::table!(@column $field $($column)?), out); )*
            }

            fn arrays<'a, I>(rows: I, out: &mut Vec<arrow_array::ArrayRef>)
            where
                I: Iterator<Item = &'a Self> + Clone,
                Self: 'a,
            {
                $( <$ty as $crate::table::Columns>::arrays(rows.clone().map(|r| &r.$field), out); )*
            }

            fn view<'a>(columns: &mut std::slice::Iter<'a, arrow_array::ArrayRef>) -> $view<'a> {
                $view { $( $field: <$ty as $crate::table::Columns>::view(columns), )* }
            }

            fn get(view: &$view<'_>, i: usize) -> Self {
                view.row(i)
            }
        }
    };
}

pub(crate) use table;

/// A Rust number stored as an Arrow primitive.
pub trait Primitive: arrow_buffer::ArrowNativeType {
    type Arrow: ArrowPrimitiveType<Native = Self>;
}

/// Numbers: one non-null primitive column, viewed as a slice.
macro_rules! primitive {
    ($($t:ty => $arrow:ty),*) => {$(
        impl Primitive for $t {
            type Arrow = $arrow;
        }

        impl Columns for $t {
            type View<'a> = &'a [$t];
            fn fields(name: &'static str, out: &mut Vec<Field>) {
                out.push(Field::new(name, <$arrow>::DATA_TYPE, false));
            }
            fn arrays<'a, I>(rows: I, out: &mut Vec<ArrayRef>)
            where
                I: Iterator<Item = &'a Self> + Clone,
            {
                out.push(Arc::new(PrimitiveArray::<$arrow>::from_iter_values(rows.copied())));
            }
            fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> &'a [$t] {
                next(columns).as_primitive::<$arrow>().values()
            }
            fn get(view: &&[$t], i: usize) -> $t {
                view[i]
            }
        }
    )*};
}

primitive!(u8 => UInt8Type, u16 => UInt16Type, u32 => UInt32Type, u64 => UInt64Type, i8 => Int8Type, f32 => Float32Type);

impl Columns for bool {
    type View<'a> = &'a BooleanArray;
    fn fields(name: &'static str, out: &mut Vec<Field>) {
        out.push(Field::new(name, DataType::Boolean, false));
    }
    fn arrays<'a, I: Iterator<Item = &'a Self> + Clone>(rows: I, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(BooleanArray::from_iter(rows.map(|&b| Some(b)))));
    }
    fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> &'a BooleanArray {
        next(columns).as_boolean()
    }
    fn get(view: &&BooleanArray, i: usize) -> bool {
        view.value(i)
    }
}

impl Columns for String {
    type View<'a> = &'a StringArray;
    fn fields(name: &'static str, out: &mut Vec<Field>) {
        out.push(Field::new(name, DataType::Utf8, false));
    }
    fn arrays<'a, I: Iterator<Item = &'a Self> + Clone>(rows: I, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(StringArray::from_iter_values(rows)));
    }
    fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> &'a StringArray {
        next(columns).as_string::<i32>()
    }
    fn get(view: &&StringArray, i: usize) -> String {
        view.value(i).to_string()
    }
}

impl Columns for Option<String> {
    type View<'a> = &'a StringArray;
    fn fields(name: &'static str, out: &mut Vec<Field>) {
        out.push(Field::new(name, DataType::Utf8, true));
    }
    fn arrays<'a, I: Iterator<Item = &'a Self> + Clone>(rows: I, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(StringArray::from_iter(rows.map(Option::as_deref))));
    }
    fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> &'a StringArray {
        next(columns).as_string::<i32>()
    }
    fn get(view: &&StringArray, i: usize) -> Option<String> {
        view.is_valid(i).then(|| view.value(i).to_string())
    }
}

impl Columns for Option<f32> {
    type View<'a> = &'a Float32Array;
    fn fields(name: &'static str, out: &mut Vec<Field>) {
        out.push(Field::new(name, DataType::Float32, true));
    }
    fn arrays<'a, I: Iterator<Item = &'a Self> + Clone>(rows: I, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(Float32Array::from_iter(rows.copied())));
    }
    fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> &'a Float32Array {
        next(columns).as_primitive::<Float32Type>()
    }
    fn get(view: &&Float32Array, i: usize) -> Option<f32> {
        view.is_valid(i).then(|| view.value(i))
    }
}

/// A `List` column viewed in place: row `i` is `values[offsets[i]..offsets[i + 1]]`.
#[derive(Clone, Copy, Debug)]
pub struct ListView<'a, T> {
    offsets: &'a [i32],
    values: &'a [T],
}

impl<'a, T> ListView<'a, T> {
    /// Row `i`'s items, borrowed from the mapping.
    pub fn get(&self, i: usize) -> &'a [T] {
        &self.values[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

impl<T: Primitive> Columns for Vec<T> {
    type View<'a> = ListView<'a, T>;
    fn fields(name: &'static str, out: &mut Vec<Field>) {
        let item = Field::new("item", T::Arrow::DATA_TYPE, true);
        out.push(Field::new(name, DataType::List(Arc::new(item)), false));
    }
    fn arrays<'a, I: Iterator<Item = &'a Self> + Clone>(rows: I, out: &mut Vec<ArrayRef>) {
        let mut b = ListBuilder::new(PrimitiveBuilder::<T::Arrow>::new());
        for r in rows {
            b.values().append_slice(r);
            b.append(true);
        }
        out.push(Arc::new(b.finish()));
    }
    fn view<'a>(columns: &mut std::slice::Iter<'a, ArrayRef>) -> ListView<'a, T> {
        let list = next(columns).as_list::<i32>();
        ListView { offsets: list.value_offsets(), values: list.values().as_primitive::<T::Arrow>().values() }
    }
    fn get(view: &ListView<'_, T>, i: usize) -> Vec<T> {
        view.get(i).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    table! {
        #[derive(Clone, Debug, Default, PartialEq)]
        struct Inner, view InnerColumns {
            a: u8 as "inner_a",
            b: Option<f32>,
        }
    }

    table! {
        #[derive(Clone, Debug, PartialEq)]
        struct Outer, view OuterColumns {
            id: u32,
            flag: bool,
            name: String,
            note: Option<String>,
            inner: Inner,
            items: Vec<u64>,
            small: i8,
        }
        not stored { extra: Option<u16> }
    }

    fn outer(i: u32) -> Outer {
        Outer {
            id: i,
            flag: i.is_multiple_of(2),
            name: format!("n{i}"),
            note: (i != 1).then(|| "x".repeat(i as usize)),
            inner: Inner { a: i as u8, b: (i > 0).then_some(i as f32 / 2.0) },
            items: (0..u64::from(i)).collect(),
            small: -(i as i8),
            extra: None,
        }
    }

    #[test]
    fn schema_flattens_groups_and_renames_columns() {
        let names: Vec<String> = fields::<Outer>().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["id", "flag", "name", "note", "inner_a", "b", "items", "small"]);
        let nullable: Vec<bool> = fields::<Outer>().iter().map(|f| f.is_nullable()).collect();
        assert_eq!(nullable, [false, false, false, true, false, true, false, false]);
        let items = &fields::<Outer>()[6];
        assert_eq!(items.data_type(), &DataType::List(Arc::new(Field::new("item", DataType::UInt64, true))));
    }

    #[test]
    fn rows_read_back_through_an_ipc_file_as_written() {
        let rows: Vec<Outer> = (0..5).map(outer).collect();
        let bytes = ipc_bytes(&batch(&rows).unwrap()).unwrap();
        let reader = arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
        let read = reader.into_iter().next().unwrap().unwrap();
        let columns = view::<Outer>(&read).unwrap();
        assert_eq!((0..5).map(|i| columns.row(i)).collect::<Vec<_>>(), rows);
        assert_eq!(columns.id, &[0, 1, 2, 3, 4]);
        assert_eq!(columns.items.get(3), &[0, 1, 2]);
        let other = batch(&[Inner::default()]).unwrap();
        assert!(view::<Outer>(&other).is_err());
    }
}
