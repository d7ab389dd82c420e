//! The Arrow schema of an activation shard, built from and checked against a [`HookSpec`].
//!
//! Columns: `doc u32`, `pos u32`, `token u32`, `act FixedSizeList<f16|f32, d>` and, when the hook
//! has gradients, `grad` of the same type. No nulls anywhere.

use std::sync::Arc;

use anyhow::{Result, bail};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::manifest::{DType, HookSpec};

pub const DOC: &str = "doc";
pub const POS: &str = "pos";
pub const TOKEN: &str = "token";
pub const ACT: &str = "act";
pub const GRAD: &str = "grad";

fn element_type(dtype: DType) -> DataType {
    match dtype {
        DType::F16 => DataType::Float16,
        DType::F32 => DataType::Float32,
    }
}

/// The list element field of `act` and `grad`.
pub fn item_field(dtype: DType) -> Arc<Field> {
    Arc::new(Field::new("item", element_type(dtype), false))
}

fn vector_type(spec: &HookSpec) -> DataType {
    DataType::FixedSizeList(item_field(spec.dtype), spec.d as i32)
}

/// The schema every shard of a hook with this spec has.
pub fn shard_schema(spec: &HookSpec) -> SchemaRef {
    let mut fields = vec![
        Field::new(DOC, DataType::UInt32, false),
        Field::new(POS, DataType::UInt32, false),
        Field::new(TOKEN, DataType::UInt32, false),
        Field::new(ACT, vector_type(spec), false),
    ];
    if spec.grad {
        fields.push(Field::new(GRAD, vector_type(spec), false));
    }
    Arc::new(Schema::new(fields))
}

/// Check a shard's schema against the spec the manifest gives its hook; the error says what differs.
pub fn check_schema(schema: &Schema, spec: &HookSpec) -> Result<()> {
    for name in [DOC, POS, TOKEN] {
        match schema.field_with_name(name) {
            Ok(f) if f.data_type() == &DataType::UInt32 => {}
            Ok(f) => bail!("column {name} has type {}, expected UInt32", f.data_type()),
            Err(_) => bail!("column {name} is missing"),
        }
    }
    check_vector(schema, ACT, spec)?;
    match (spec.grad, schema.field_with_name(GRAD).is_ok()) {
        (true, true) => check_vector(schema, GRAD, spec)?,
        (true, false) => bail!("column grad is missing but the manifest says the hook has gradients"),
        (false, true) => bail!("column grad is present but the manifest says the hook has no gradients"),
        (false, false) => {}
    }
    let expected = if spec.grad { 5 } else { 4 };
    if schema.fields().len() != expected {
        bail!("shard has {} columns, expected {expected}", schema.fields().len());
    }
    Ok(())
}

fn check_vector(schema: &Schema, name: &str, spec: &HookSpec) -> Result<()> {
    let Ok(field) = schema.field_with_name(name) else {
        bail!("column {name} is missing");
    };
    match field.data_type() {
        DataType::FixedSizeList(item, width) => {
            if *width as i64 != spec.d as i64 {
                bail!("column {name} has width {width}, but the manifest says d = {}", spec.d);
            }
            if item.data_type() != &element_type(spec.dtype) {
                bail!("column {name} holds {}, but the manifest says {}", item.data_type(), spec.dtype);
            }
            Ok(())
        }
        other => bail!("column {name} has type {other}, expected FixedSizeList<{}, {}>", spec.dtype, spec.d),
    }
}
