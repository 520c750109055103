//! The GraphQL schema is checked in as `schema.graphql`: a change to the API shows as a diff there.
//! Run with `UPDATE_SCHEMA=1` to rewrite it after an intended change.

#[test]
fn the_checked_in_schema_is_the_served_one() {
    let sdl = understudy_api::graphql::sdl();
    let path = format!("{}/../schema.graphql", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &sdl).expect("write schema.graphql");
    }
    let checked_in = std::fs::read_to_string(&path).expect("schema.graphql is checked in at the repository root");
    assert!(
        checked_in == sdl,
        "schema.graphql is out of date: run `UPDATE_SCHEMA=1 cargo test -p understudy-api --test schema` and commit the diff"
    );
}
