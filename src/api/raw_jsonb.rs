//! `jsonb` arguments passed through untouched. pgrx's `JsonB` would print the value to text and
//! parse it into serde values on every call; enqueue only hands the datum on to the INSERT.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::{FromDatum, IntoDatum};
use std::ffi::CStr;

#[derive(Clone, Copy)]
pub struct RawJsonb(pub pg_sys::Datum);

impl RawJsonb {
    /// Length in bytes of the value's JSON text (what `queue.max_payload_bytes` limits).
    pub fn text_len(self) -> usize {
        unsafe {
            let text =
                pgrx::fcinfo::direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(self.0)])
                    .expect("jsonb_out returned NULL");
            let len = text.to_bytes().len();
            pg_sys::pfree(text.as_ptr() as *mut std::ffi::c_void);
            len
        }
    }

    /// `jsonb_typeof()`: "object", "array", "string", "number", "boolean" or "null".
    pub fn type_name(self) -> String {
        unsafe {
            pgrx::fcinfo::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(self.0)])
                .expect("jsonb_typeof returned NULL")
        }
    }
}

impl FromDatum for RawJsonb {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null).then_some(RawJsonb(datum))
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for RawJsonb {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        unsafe {
            arg.unbox_arg_using_from_datum()
                .expect("a non-null jsonb argument")
        }
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

impl IntoDatum for RawJsonb {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

unsafe impl SqlTranslatable for RawJsonb {
    const TYPE_IDENT: &'static str = concat!(module_path!(), "::RawJsonb");
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}
