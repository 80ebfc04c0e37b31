//! The input, output and score schemas. The files under `schemas/` are the source of truth;
//! they are embedded in the binary and every shard and output is checked against them.
use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::Deserialize;

pub const INPUT_SCHEMA: &str = include_str!("../schemas/input.json");
pub const OUTPUT_SCHEMA: &str = include_str!("../schemas/output.json");
pub const SCORE_SCHEMA: &str = include_str!("../schemas/score.json");

#[derive(Debug, Deserialize)]
pub struct InputSchema {
    pub reserved_prefix: String,
    pub fields: Vec<InputField>,
}

#[derive(Debug, Deserialize)]
pub struct InputField {
    pub role: String,
    pub types: Vec<String>,
    pub nullable: bool,
}

#[derive(Debug, Deserialize)]
pub struct FixedSchema {
    pub fields: Vec<FixedField>,
}

#[derive(Debug, Deserialize)]
pub struct FixedField {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

/// The name the schema files use for an Arrow type; None for types they never name.
pub fn type_name(data_type: &DataType) -> Option<&'static str> {
    Some(match data_type {
        DataType::Utf8 => "utf8",
        DataType::LargeUtf8 => "large_utf8",
        DataType::Utf8View => "utf8_view",
        DataType::Int32 => "int32",
        DataType::Int64 => "int64",
        DataType::UInt32 => "uint32",
        DataType::UInt64 => "uint64",
        DataType::Float64 => "float64",
        _ => return None,
    })
}

fn data_type(name: &str) -> DataType {
    match name {
        "utf8" => DataType::Utf8,
        "large_utf8" => DataType::LargeUtf8,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "float64" => DataType::Float64,
        other => panic!("schemas/*.json names unsupported type {other}"),
    }
}

pub fn input() -> &'static InputSchema {
    static CELL: OnceLock<InputSchema> = OnceLock::new();
    CELL.get_or_init(|| serde_json::from_str(INPUT_SCHEMA).expect("schemas/input.json is valid"))
}

fn fixed(text: &str) -> Vec<Field> {
    let schema: FixedSchema = serde_json::from_str(text).expect("schema file is valid");
    schema
        .fields
        .iter()
        .map(|f| Field::new(&f.name, data_type(&f.data_type), f.nullable))
        .collect()
}

/// The columns quad appends to every output row.
pub fn output_fields() -> &'static [Field] {
    static CELL: OnceLock<Vec<Field>> = OnceLock::new();
    CELL.get_or_init(|| fixed(OUTPUT_SCHEMA))
}

/// The schema of `quad score` output files.
pub fn score_schema() -> SchemaRef {
    Arc::new(Schema::new(fixed(SCORE_SCHEMA)))
}

/// The allowed types of an input role ("id" or "text").
pub fn input_types(role: &str) -> &'static [String] {
    &input()
        .fields
        .iter()
        .find(|f| f.role == role)
        .expect("role in schemas/input.json")
        .types
}

/// The output schema for an input schema: the input columns, then the quad_* columns.
pub fn output_schema(input: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(output_fields().iter().cloned());
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_files_parse_and_agree_with_code() {
        assert_eq!(input().reserved_prefix, "quad_");
        assert!(input_types("text").contains(&"utf8".to_string()));
        assert!(input_types("id").contains(&"int64".to_string()));
        assert!(input().fields.iter().all(|f| !f.nullable));
        let names: Vec<_> = output_fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["quad_cluster", "quad_influence", "quad_round"]);
        assert_eq!(score_schema().fields().len(), 5);
    }
}
