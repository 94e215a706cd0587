//! Tests of the upstream HTTP/1.1 exchange against scripted loopback origins.

use super::*;
