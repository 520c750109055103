//! The role matrix: what each role of an account may do. It lives here, once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Owner,
    Admin,
    Member,
    Billing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Permission {
    ManageProjects,
    ManageUsers,
    ManageBilling,
    ManageSettings,
    ViewProjects,
    ViewUsers,
    ViewBilling,
    ViewSettings,
    ViewPreviewEnvironments,
}

impl Permission {
    pub const ALL: [Permission; 9] = [
        Permission::ManageProjects,
        Permission::ManageUsers,
        Permission::ManageBilling,
        Permission::ManageSettings,
        Permission::ViewProjects,
        Permission::ViewUsers,
        Permission::ViewBilling,
        Permission::ViewSettings,
        Permission::ViewPreviewEnvironments,
    ];
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Billing];

    pub fn allows(self, permission: Permission) -> bool {
        use Permission as P;
        match permission {
            P::ViewProjects | P::ViewUsers | P::ViewBilling | P::ViewSettings | P::ViewPreviewEnvironments => true,
            P::ManageProjects | P::ManageUsers | P::ManageSettings => matches!(self, Role::Owner | Role::Admin),
            P::ManageBilling => matches!(self, Role::Owner | Role::Billing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_cell_by_cell() {
        // Rows in Permission::ALL order: ManageProjects, ManageUsers, ManageBilling, ManageSettings,
        // ViewProjects, ViewUsers, ViewBilling, ViewSettings, ViewPreviewEnvironments.
        let matrix: [(Role, [bool; 9]); 4] = [
            (Role::Owner, [true, true, true, true, true, true, true, true, true]),
            (Role::Admin, [true, true, false, true, true, true, true, true, true]),
            (Role::Member, [false, false, false, false, true, true, true, true, true]),
            (Role::Billing, [false, false, true, false, true, true, true, true, true]),
        ];
        for (role, row) in matrix {
            for (permission, allowed) in Permission::ALL.into_iter().zip(row) {
                assert_eq!(role.allows(permission), allowed, "{role:?} {permission:?}");
            }
        }
    }
}
