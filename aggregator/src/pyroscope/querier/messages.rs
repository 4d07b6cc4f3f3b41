//! The querier's messages, with the field numbers of Pyroscope's
//! `querier/v1/querier.proto` and `types/v1/types.proto`.

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PbProfileType {
    #[prost(string, tag = "1")]
    pub(super) id: String,
    #[prost(string, tag = "2")]
    pub(super) name: String,
    #[prost(string, tag = "4")]
    pub(super) sample_type: String,
    #[prost(string, tag = "5")]
    pub(super) sample_unit: String,
    #[prost(string, tag = "6")]
    pub(super) period_type: String,
    #[prost(string, tag = "7")]
    pub(super) period_unit: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ProfileTypesRequest {
    #[prost(int64, tag = "1")]
    pub(super) start: i64,
    #[prost(int64, tag = "2")]
    pub(super) end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct ProfileTypesResponse {
    #[prost(message, repeated, tag = "1")]
    pub(super) profile_types: Vec<PbProfileType>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct LabelValuesRequest {
    #[prost(string, tag = "1")]
    pub(super) name: String,
    #[prost(string, repeated, tag = "2")]
    pub(super) matchers: Vec<String>,
    #[prost(int64, tag = "3")]
    pub(super) start: i64,
    #[prost(int64, tag = "4")]
    pub(super) end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct LabelNamesRequest {
    #[prost(string, repeated, tag = "1")]
    pub(super) matchers: Vec<String>,
    #[prost(int64, tag = "2")]
    pub(super) start: i64,
    #[prost(int64, tag = "3")]
    pub(super) end: i64,
}

/// `LabelValuesResponse` and `LabelNamesResponse`: both `repeated string names = 1`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct NamesResponse {
    #[prost(string, repeated, tag = "1")]
    pub(super) names: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SeriesRequest {
    #[prost(string, repeated, tag = "1")]
    pub(super) matchers: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub(super) label_names: Vec<String>,
    #[prost(int64, tag = "3")]
    pub(super) start: i64,
    #[prost(int64, tag = "4")]
    pub(super) end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PbLabels {
    #[prost(message, repeated, tag = "1")]
    pub(super) labels: Vec<LabelPair>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SeriesResponse {
    #[prost(message, repeated, tag = "2")]
    pub(super) labels_set: Vec<PbLabels>,
}

/// `SelectMergeStacktracesRequest` and `SelectMergeProfileRequest` share
/// their first five fields; `format` (6) is the former's only.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SelectMergeRequest {
    #[prost(string, tag = "1")]
    pub(super) profile_type_id: String,
    #[prost(string, tag = "2")]
    pub(super) label_selector: String,
    #[prost(int64, tag = "3")]
    pub(super) start: i64,
    #[prost(int64, tag = "4")]
    pub(super) end: i64,
    #[prost(int64, optional, tag = "5")]
    pub(super) max_nodes: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SelectMergeStacktracesRequest {
    #[prost(string, tag = "1")]
    pub(super) profile_type_id: String,
    #[prost(string, tag = "2")]
    pub(super) label_selector: String,
    #[prost(int64, tag = "3")]
    pub(super) start: i64,
    #[prost(int64, tag = "4")]
    pub(super) end: i64,
    #[prost(int64, optional, tag = "5")]
    pub(super) max_nodes: Option<i64>,
    #[prost(int32, tag = "6")]
    pub(super) format: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Level {
    #[prost(int64, repeated, tag = "1")]
    pub(super) values: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct FlameGraph {
    #[prost(string, repeated, tag = "1")]
    pub(super) names: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub(super) levels: Vec<Level>,
    #[prost(int64, tag = "3")]
    pub(super) total: i64,
    #[prost(int64, tag = "4")]
    pub(super) max_self: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SelectMergeStacktracesResponse {
    #[prost(message, optional, tag = "1")]
    pub(super) flamegraph: Option<FlameGraph>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SelectSeriesRequest {
    #[prost(string, tag = "1")]
    pub(super) profile_type_id: String,
    #[prost(string, tag = "2")]
    pub(super) label_selector: String,
    #[prost(int64, tag = "3")]
    pub(super) start: i64,
    #[prost(int64, tag = "4")]
    pub(super) end: i64,
    #[prost(string, repeated, tag = "5")]
    pub(super) group_by: Vec<String>,
    #[prost(double, tag = "6")]
    pub(super) step: f64,
    /// Read and not used: every point is the step's sum.
    #[prost(int32, optional, tag = "7")]
    pub(super) aggregation: Option<i32>,
    #[prost(int64, optional, tag = "9")]
    pub(super) limit: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Point {
    #[prost(double, tag = "1")]
    pub(super) value: f64,
    #[prost(int64, tag = "2")]
    pub(super) timestamp: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PbSeries {
    #[prost(message, repeated, tag = "1")]
    pub(super) labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    pub(super) points: Vec<Point>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct SelectSeriesResponse {
    #[prost(message, repeated, tag = "1")]
    pub(super) series: Vec<PbSeries>,
}
